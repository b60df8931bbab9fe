"""tftrain: train Keras 3 models under tf.distribute with tftrain's own loop.

Importing tftrain does no TensorFlow work: no strategy, no seeds, no flags.
"""

__version__ = "0.1.0"

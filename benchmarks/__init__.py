"""tftrain's benchmarks (``python -m benchmarks``: the race).

tftrain is imported first so that every runner, Keras ``fit`` and the
products alone too, runs under the TensorFlow settings tftrain's runs get
(oneDNN's kernels): a runner's process inherits them.
"""

import tftrain  # noqa: F401

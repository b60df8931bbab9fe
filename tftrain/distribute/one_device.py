"""``--strategy=one_device``: the first GPU, or the CPU.

TensorFlow's default strategy, not ``OneDeviceStrategy``: with one device
there is nothing to distribute, and the wrapper's replica context cost about
7% of the MLP's step on a CPU (BUILD_NOTES.md). TensorFlow places the ops
on the first GPU when there is one.
"""

from __future__ import annotations

from tftrain.distribute.base import ParallelMode, Placement


class OneDevice(ParallelMode):
    name = "one_device"

    def create(self) -> Placement:
        import tensorflow as tf

        return Placement(tf.distribute.get_strategy())

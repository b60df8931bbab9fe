"""``--strategy=one_device``: the first GPU, or the CPU."""

from __future__ import annotations

from tftrain.distribute.base import ParallelMode, Placement


class OneDevice(ParallelMode):
    name = "one_device"

    def create(self) -> Placement:
        import tensorflow as tf

        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return Placement(tf.distribute.OneDeviceStrategy(device))

"""Checkpoints of a run: the model, the optimizer and the global step.

The global step is also the data position (the stream is a function of it),
so restoring these three resumes a run exactly. Every worker takes part in
a save (variable reads can be collective); only the chief keeps it.
"""

from __future__ import annotations

import os
import shutil

import tensorflow as tf

from tftrain.errors import RunError


class Checkpoints:
    def __init__(self, *, model_dir: str, out, objects: dict, step_counter, keep: int, is_chief):
        self.model_dir, self.is_chief = model_dir, is_chief
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, out.path("checkpoints"), max_to_keep=keep, step_counter=step_counter
        )

    @property
    def folder(self) -> str:
        return os.path.join(self.model_dir, "checkpoints")

    def restore_latest(self) -> str | None:
        """Restores the latest checkpoint in model_dir, if any; returns its path."""
        latest = tf.train.latest_checkpoint(self.folder)
        if not latest:
            return None
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            raise RunError(
                f"--model_dir={self.model_dir} holds a checkpoint ({latest}) "
                "that does not fit this run's model or optimizer "
                f"({str(e).splitlines()[0]}). Expected the same --model/--optimizer "
                "as the run that wrote it, or a new --model_dir. Nothing was changed."
            ) from None
        return latest

    def save(self, step: int) -> None:
        saved = self.manager.save(checkpoint_number=step)
        if not self.is_chief:  # every worker saves; only the chief keeps it
            shutil.rmtree(os.path.dirname(saved), ignore_errors=True)

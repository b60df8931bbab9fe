"""The run's outputs beside its checkpoints: the SavedModel and a fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil

import numpy as np


def weights_fingerprint(model) -> str:
    """SHA-256 of the model's weights, bit for bit: equal on every worker."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def export_saved_model(model, task, path: str) -> str:
    """Writes a SavedModel whose ``serving_default`` maps the task's inputs to
    the model's outputs; replaces ``path`` only once the new one is complete."""
    import keras
    import tensorflow as tf

    name, dtype, shape = task.serving_input()
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        # float32 logits whatever the layers compute in (--precision).
        lambda inputs: tf.cast(model(inputs, training=False), tf.float32),
        input_signature=[tf.TensorSpec([None, *shape], dtype, name=name)],
    )
    staging = path + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            archive.write_out(staging, verbose=False)  # it prints a long listing
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk: leave no half export
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)
    return path

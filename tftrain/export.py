"""The run's outputs beside its checkpoints: the SavedModel and a fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import os

import numpy as np

from tftrain import fileio
from tftrain.errors import first_line


def weights_fingerprint(model) -> str:
    """SHA-256 of the model's weights, bit for bit: equal on every worker."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def batch_spec(features):
    """TensorSpecs of a batch of ``features`` (any structure), any batch size."""
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), features)


def serving_signature(model, features):
    """What ``serving_default`` takes: the model's own inputs (their names,
    dtypes and shapes, one or several, in a list or a dict), or for a model
    without declared inputs (a subclass), the training batches' features."""
    import tensorflow as tf

    try:
        declared = model.input
    except (AttributeError, ValueError):
        declared = None
    if declared is not None:

        def spec(tensor, key=None):
            name = key or getattr(tensor, "name", None)
            return tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype, name=name)

        if isinstance(declared, dict):
            return {k: spec(v, k) for k, v in declared.items()}
        return tf.nest.map_structure(spec, declared)
    specs = batch_spec(features)
    if isinstance(specs, dict):
        return {k: tf.TensorSpec(v.shape, v.dtype, name=k) for k, v in specs.items()}
    return specs


def export_saved_model(model, features, path: str, log=print) -> str:
    """Writes a SavedModel whose ``serving_default`` maps the model's inputs
    (:func:`serving_signature`) to its float32 outputs, and beside it
    ``model.keras`` for ``keras.models.load_model``; replaces ``path`` only
    once the new export is complete."""
    import keras
    import tensorflow as tf

    signature = serving_signature(model, features)
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(inputs):
        # float32 outputs whatever the layers compute in (--precision).
        outputs = model(inputs, training=False)
        return tf.nest.map_structure(
            lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t, outputs
        )

    archive.add_endpoint("serve", serve, input_signature=[signature])
    staging = path + ".partial"
    fileio.rmtree(staging)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            archive.write_out(staging, verbose=False)  # it prints a long listing
    except BaseException:
        fileio.rmtree(staging)  # a full disk: leave no half export
        raise
    fileio.rmtree(path)
    fileio.replace(staging, path)
    keras_file = os.path.join(os.path.dirname(path), "model.keras")
    try:
        model.save(keras_file + ".partial.keras")
        fileio.replace(keras_file + ".partial.keras", keras_file)
    except Exception as e:  # noqa: BLE001 - a model Keras cannot serialize: said, not fatal
        with contextlib.suppress(OSError, tf.errors.OpError):
            fileio.remove(keras_file + ".partial.keras")
        first = first_line(e)[:200]
        log(
            f"Note: no model.keras was written ({type(e).__name__}: {first}); the SavedModel "
            f"in {path} serves the model, and the checkpoints hold its weights."
        )
    return path

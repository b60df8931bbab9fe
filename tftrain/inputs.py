"""From a task's ``build_inputs`` to the streams a parallel mode distributes.

A mode calls the function :func:`stream` returns with TensorFlow's
``InputContext`` for each input pipeline (or none: one pipeline, one
replica). The task sees tftrain's context: TensorFlow's, plus
``start_step``, the step a resumed run starts from (only a stream that is a
function of the step needs it; every other stream's position is restored
from the checkpoint). Training streams are repeated epoch by epoch and
marked endless.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from tftrain.errors import DataError
from tftrain.tasks import call_user


@functools.cache
def _context_class():
    import tensorflow as tf

    class InputContext(tf.distribute.InputContext):
        """TensorFlow's InputContext, and the step a resumed run starts from."""

        def __init__(
            self, num_input_pipelines, input_pipeline_id, num_replicas_in_sync, start_step
        ):
            super().__init__(num_input_pipelines, input_pipeline_id, num_replicas_in_sync)
            self.start_step = start_step

    return InputContext


def input_context(
    num_input_pipelines: int = 1,
    input_pipeline_id: int = 0,
    num_replicas_in_sync: int = 1,
    start_step: int = 0,
):
    """TensorFlow's ``InputContext`` with ``start_step`` added."""
    return _context_class()(
        num_input_pipelines, input_pipeline_id, num_replicas_in_sync, start_step
    )


def build(task, config, context, training: bool):
    """The task's dataset for ``context``, checked: ``(features, labels[, weights])``."""
    import tensorflow as tf

    name = f"{type(task).__name__}.build_inputs"
    ds = call_user(name, task.build_inputs, config, context, training)
    if not isinstance(ds, tf.data.Dataset):
        raise DataError(
            f"{name}(training={training}) returned {type(ds).__name__}: expected a "
            "tf.data.Dataset of (features, labels) or (features, labels, sample_weights) batches."
        )
    spec = ds.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise DataError(
            f"{name}(training={training}) gives elements of {_describe(spec)}: expected "
            "(features, labels) or (features, labels, sample_weights) batches."
        )
    if isinstance(spec[1], tf.TensorSpec) and spec[1].shape.rank == 0:
        raise DataError(
            f"{name}(training={training}) gives one example at a time (its labels have "
            "no batch dimension): batch the dataset, to "
            "context.get_per_replica_batch_size(config.batch_size) for training."
        )
    for part, what in zip(spec[1:], ("labels", "sample weights")):
        if not isinstance(part, tf.TensorSpec):
            raise DataError(
                f"{name}(training={training}) gives {what} of {_describe(part)}: expected "
                "one tensor per batch (tftrain trains models with one output)."
            )
    return ds


def _describe(spec) -> str:
    import tensorflow as tf

    if isinstance(spec, tf.TensorSpec):
        return f"one tensor {spec.dtype.name}{list(spec.shape)}"
    if isinstance(spec, tuple):
        return f"a tuple of {len(spec)}"
    return type(spec).__name__


def stream(task, config, training: bool, start_step: int = 0):
    """``make(context=None) -> tf.data.Dataset``: the task's batches for one
    input pipeline, endless for training."""

    def make(context=None):
        import tensorflow as tf

        ours = input_context(
            getattr(context, "num_input_pipelines", 1),
            getattr(context, "input_pipeline_id", 0),
            getattr(context, "num_replicas_in_sync", 1),
            start_step,
        )
        if training and ours.num_replicas_in_sync % ours.num_input_pipelines:
            raise DataError("the replicas do not split evenly over the input pipelines.")
        ds = build(task, config, ours, training)
        if training:
            if ds.cardinality() != tf.data.INFINITE_CARDINALITY:
                ds = ds.repeat()
            # Said, not guessed: for a stream of unknown length a multi-worker
            # strategy asks every worker "still data?" before every step.
            ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        return ds

    return make


@dataclasses.dataclass(frozen=True)
class Probe:
    """What one local build of the training data tells before training:
    built once, so the data are not opened (or copied into constants) again
    for each question."""

    first_batch: tuple  # one global batch: the checks, the export's shapes, histograms
    steps_per_epoch: int | None  # None: unknown
    positioned: bool  # a function of the step (built at the restored step)


def probe(task, config) -> Probe:
    """The training data, built once with one pipeline holding every replica."""
    ds = build(task, config, input_context(), True)
    _check_evaluation(task, ds.element_spec, build(task, config, input_context(), False))
    return Probe(
        first_batch=_first(ds, task, True),
        steps_per_epoch=_steps_per_epoch(task, config, ds),
        positioned=task._positions_by_step or bool(getattr(ds, "tftrain_positioned", False)),
    )


def _check_evaluation(task, train_spec, ds) -> None:
    """DataError, before anything is written, for evaluation data that are
    empty or hold examples of another shape or type than the training data
    (the first evaluation would fail, or measure nothing, after the run's
    folder is made)."""
    import tensorflow as tf

    name = f"{type(task).__name__}.build_inputs(training=False)"
    eval_spec = ds.element_spec
    for part, what in ((0, "features"), (1, "labels")):
        trained, evaluated = train_spec[part], eval_spec[part]
        try:
            tf.nest.assert_same_structure(trained, evaluated)
        except (ValueError, TypeError):
            raise DataError(
                f"{name} gives {what} of {_describe(evaluated)}; the training data's are "
                f"{_describe(trained)}: both splits must hold examples of one form."
            ) from None
        for t, e in zip(tf.nest.flatten(trained), tf.nest.flatten(evaluated)):
            if not (isinstance(t, tf.TensorSpec) and isinstance(e, tf.TensorSpec)):
                continue
            if (part == 0 and t.dtype != e.dtype) or not t.shape[1:].is_compatible_with(
                e.shape[1:]
            ):
                raise DataError(
                    f"{name} gives {what} of {e.dtype.name}{list(e.shape[1:])} per example; "
                    f"the training data's are {t.dtype.name}{list(t.shape[1:])}: both splits "
                    "must hold examples of one shape and type."
                )
    _first(ds, task, False)


def first_batch(task, config, training: bool = True):
    """The first batch of one pipeline holding every replica's examples
    (the global batch), for checks before training; DataError if there is none."""
    return _first(build(task, config, input_context(), training), task, training)


def _first(ds, task, training: bool):
    import tensorflow as tf

    what = "training" if training else "evaluation"
    try:
        for batch in ds.take(1):
            return batch
    except tf.errors.InvalidArgumentError as e:
        # A record the parsing cannot read (a missing feature, a wrong type):
        # TensorFlow's reason, without its graph's noise.
        reason = re.sub(r"\{\{.*?\}\}\s*", "", str(e).strip().splitlines()[0])
        reason = re.sub(r"^Error in user-defined function passed to \S+ ", "", reason)
        raise DataError(
            f"{type(task).__name__}.build_inputs(training={training}): the {what} data "
            f"cannot be read: {reason[:400]}"
        ) from None
    raise DataError(
        f"{type(task).__name__}.build_inputs(training={training}) gives no batch: the "
        + ("training" if training else "evaluation")
        + " data are empty (or hold fewer examples than one batch)."
    )


def _steps_per_epoch(task, config, ds) -> int | None:
    """Training steps in one pass: the config's, the task's own count, or the
    training dataset's length (``ds``); None when unknown."""
    import tensorflow as tf

    if config.steps_per_epoch:
        return config.steps_per_epoch
    own = getattr(task, "steps_per_epoch", None)
    if callable(own):
        counted = call_user(f"{type(task).__name__}.steps_per_epoch", own, config)
        if counted is not None:
            return int(counted)
    marked = getattr(ds, "tftrain_steps_per_epoch", None)  # tftrain.data's endless streams
    if marked:
        return int(marked)
    n = int(ds.cardinality())
    if n == tf.data.UNKNOWN_CARDINALITY or n == tf.data.INFINITE_CARDINALITY:
        return None
    if n == 0:
        raise DataError(
            f"{type(task).__name__}.build_inputs(training=True) gives no batch of "
            f"--batch_size={config.batch_size}: the training data hold fewer examples."
        )
    return n

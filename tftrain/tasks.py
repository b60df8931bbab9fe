"""Tasks: what is learned. A :class:`Task` builds the model and its data;
its loss and metrics (its own, or the model's compiled ones) become a
:class:`Scorer`, which is all the loop, the strategies and the actions see.

A scorer turns a batch into a float32 vector of statistics that is summed
over batches, replicas and workers: the sum of the per-example losses, the
example count, and each metric's state after that batch alone (Keras's
stateless metric API, from zeros). Every metric whose state is a sum over
batches (Keras's own: means, counts, confusion matrices, AUC's buckets)
therefore aggregates exactly under every strategy with one sum.
"""

from __future__ import annotations

import functools
from typing import Any

from tftrain.errors import ConfigError, DataError, UserCodeError, first_line

# Names the loop itself reports: no metric may take them.
RESERVED = ("loss", "examples", "learning_rate", "gradient_norm")


class Task:
    """What a run learns: subclass it and name the subclass in an
    :class:`tftrain.ExperimentConfig` (``task=MyTask``).

    tftrain creates the task with no arguments and calls:

    - ``build_model(config)``: any Keras 3 model (Sequential, functional or
      subclassed), inside the strategy's scope. If it is compiled, its
      compiled loss and metrics are used unless the methods below are
      overridden.
    - ``build_inputs(config, context, training)``: a ``tf.data.Dataset`` of
      ``(features, labels)`` or ``(features, labels, sample_weights)``,
      batched to ``context.get_per_replica_batch_size(config.batch_size)``
      and sharded by ``context.input_pipeline_id`` of
      ``context.num_input_pipelines`` (TensorFlow's ``InputContext``). One
      pass over the data (tftrain repeats it epoch by epoch), or an endless
      stream with ``--train_steps``. :mod:`tftrain.data` has helpers.
    - ``build_loss(config)``: a Keras loss (default: the compiled one).
    - ``build_metrics(config)``: a list of Keras metrics (default: the
      compiled ones, else none).
    """

    # The built-in in-memory stream is a function of (seed, step) and is
    # positioned by ``context.start_step``; every other task's position is
    # the input iterator's state, saved in each checkpoint.
    _positions_by_step = False

    def build_model(self, config):
        raise NotImplementedError(f"{type(self).__name__} must define build_model(self, config)")

    def build_inputs(self, config, context, training: bool):
        raise NotImplementedError(
            f"{type(self).__name__} must define build_inputs(self, config, context, training)"
        )

    def build_loss(self, config):
        return None

    def build_metrics(self, config):
        return None

    # -- what the run says about itself (optional) -------------------------

    def check(self, config) -> None:
        """Checks that need no TensorFlow, before anything starts (optional)."""

    def describe(self, config) -> dict[str, Any]:
        """Extra entries for metrics.json (optional)."""
        return {}


# The module name tftrain gives an experiment file it loads (registry).
FILE_MODULE_PREFIX = "tftrain_experiment_"


def task_name(task) -> str:
    """``module:QualName`` of a task class (or instance): where it came from.
    A file's module is named by its stem, as Python would import it, so that
    ``--experiment=my_exp.py`` and ``tftrain.train`` of its imported task
    record one name."""
    cls = task if isinstance(task, type) else type(task)
    return plain_task_name(f"{cls.__module__}:{cls.__qualname__}")


def plain_task_name(name):
    """A recorded task name without the prefix of a loaded file's module
    (runs recorded before the names were made one keep resuming)."""
    return name.removeprefix(FILE_MODULE_PREFIX) if isinstance(name, str) else name


def call_user(what: str, fn, *args, **kwargs):
    """Calls the user's ``fn``; an exception it raises becomes a
    UserCodeError that keeps its traceback for the person to read."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError, UserCodeError):
        raise
    except Exception as e:  # noqa: BLE001 - their bug: shown whole, then one line
        raise UserCodeError(what, e) from e


# -- the loss and the metrics ----------------------------------------------


def _function_loss(fn, name: str):
    import keras

    class FunctionLoss(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return fn(y_true, y_pred)

    return FunctionLoss(name=name)


def resolve_loss(task, config, model):
    """The task's loss, or the model's compiled loss, as a Keras Loss object."""
    import keras

    loss = call_user(f"{type(task).__name__}.build_loss", task.build_loss, config)
    source = f"{type(task).__name__}.build_loss"
    if loss is None:
        loss, source = getattr(model, "loss", None), "the model's compiled loss"
    if loss is None:
        raise ConfigError(
            f"{type(task).__name__} has no loss: compile the model with one "
            "(model.compile(loss=...)) or define build_loss(self, config)."
        )
    if isinstance(loss, (dict, list, tuple)) or (
        not isinstance(loss, (str, keras.losses.Loss)) and hasattr(loss, "__len__")
    ):
        raise ConfigError(
            f"{source} holds several losses (one per output): tftrain trains models with "
            "one output and one loss; give the model a single output (concatenate the "
            "heads) and one loss for it."
        )
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            raise ConfigError(f"{source}: Keras has no loss named {loss!r}.") from None
    if isinstance(loss, type) and issubclass(loss, keras.losses.Loss):
        loss = loss()
    if not isinstance(loss, keras.losses.Loss):
        if not callable(loss):
            raise ConfigError(f"{source} is {loss!r}: expected a keras.losses.Loss or a function.")
        loss = _function_loss(loss, getattr(loss, "__name__", "loss"))
    return loss


def _loss_kind(loss) -> str:
    """``sparse``, ``categorical``, ``binary`` (cross-entropies) or ``other``."""
    name = type(loss).__name__.lower()
    fn = getattr(loss, "fn", None)
    name += " " + getattr(fn, "__name__", "").lower()
    for kind in ("sparse", "binary", "categorical"):
        if kind in name and "crossentropy" in name or kind in name and "focal" in name:
            return kind
    return "other"


def from_logits(loss) -> bool | None:
    try:
        return loss.get_config().get("from_logits")
    except Exception:  # noqa: BLE001 - a user's loss without a config
        return None


def _accuracy_for(loss, name: str):
    import keras

    kind = _loss_kind(loss)
    if kind == "sparse":
        return keras.metrics.SparseCategoricalAccuracy(name=name)
    if kind == "categorical":
        return keras.metrics.CategoricalAccuracy(name=name)
    if kind == "binary":
        return keras.metrics.BinaryAccuracy(name=name, threshold=0.0 if from_logits(loss) else 0.5)
    return keras.metrics.Accuracy(name=name)


def resolve_metrics(task, config, model, loss) -> list:
    """The task's metrics, or the model's compiled ones, as Keras Metric objects."""
    import keras

    from tftrain import _internal

    given = call_user(f"{type(task).__name__}.build_metrics", task.build_metrics, config)
    source = f"{type(task).__name__}.build_metrics"
    if given is None:
        given, source = _internal.compiled_metrics(model), "the model's compiled metrics"
    if isinstance(given, dict):
        raise ConfigError(
            f"{source} is a dict (metrics per output): tftrain trains models with one output; "
            "give a list of metrics."
        )
    metrics = []
    for m in given or []:
        if isinstance(m, str) and m in ("accuracy", "acc"):
            m = _accuracy_for(loss, m)
        elif isinstance(m, str):
            try:
                found = keras.metrics.get(m)
            except ValueError:
                raise ConfigError(f"{source}: Keras has no metric named {m!r}.") from None
            if isinstance(found, keras.metrics.Metric):  # named as the user wrote it
                found = type(found).from_config({**found.get_config(), "name": m})
            else:
                found = keras.metrics.MeanMetricWrapper(found, name=m)
            m = found
        elif isinstance(m, type) and issubclass(m, keras.metrics.Metric):
            m = m()
        elif not isinstance(m, keras.metrics.Metric):
            if not callable(m) or isinstance(m, (list, tuple, dict)):
                raise ConfigError(
                    f"{source} holds {m!r}: expected keras.metrics.Metric objects, "
                    "metric names or functions (one output)."
                )
            m = keras.metrics.MeanMetricWrapper(m, name=getattr(m, "__name__", "metric"))
        metrics.append(m)
    names = [m.name for m in metrics]
    for name in names:
        if name in RESERVED or names.count(name) > 1:
            raise ConfigError(
                f"{source}: a metric named {name!r} "
                + ("is reported by tftrain itself" if name in RESERVED else "appears twice")
                + ": give it another name (name=...)."
            )
    return metrics


class Scorer:
    """The per-example loss and the summed statistics of one loss and its metrics.

    Args:
      loss: a Keras loss; its own reduction is replaced by tftrain's (the
        sum over the global batch, divided by the global batch size).
      metrics: Keras metrics, built (``metric.variables`` exist).
    """

    def __init__(self, loss, metrics=()):
        self.loss = loss
        self.metrics = list(metrics)
        self._layout = [[(tuple(v.shape), v.dtype) for v in m.variables] for m in self.metrics]
        self.num_stats = 2 + sum(_size(shape) for spec in self._layout for shape, _ in spec)

    @property
    def metric_names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def per_example_loss(self, labels, outputs, weights=None):
        """One float32 loss per example (weighted by ``weights``)."""
        import tensorflow as tf

        # The loss's own reduction is set aside while the call is traced (a
        # copy would not do: Keras copies a loss by serializing it, which an
        # unregistered class of the user's cannot survive).
        reduction, self.loss.reduction = self.loss.reduction, "none"
        try:
            values = self.loss(labels, outputs, sample_weight=weights)
        finally:
            self.loss.reduction = reduction
        values = tf.cast(values, tf.float32)
        if values.shape.rank and values.shape.rank > 1:  # per time step or pixel
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    def batch_stats(self, labels, outputs, per_example, weights=None):
        import tensorflow as tf

        parts = [
            tf.reshape(tf.reduce_sum(per_example), [1]),
            tf.reshape(tf.cast(tf.size(per_example), tf.float32), [1]),
        ]
        for metric, spec in zip(self.metrics, self._layout):
            zeros = [tf.zeros(shape, dtype) for shape, dtype in spec]
            state = metric.stateless_update_state(zeros, labels, outputs, sample_weight=weights)
            parts.extend(tf.reshape(tf.cast(s, tf.float32), [-1]) for s in state)
        return tf.concat(parts, 0)

    def summarise(self, stats) -> dict[str, float]:
        """``loss``, ``examples`` and each metric's result, by its own name."""
        import numpy as np

        stats = np.asarray(stats, np.float64)
        count = max(float(stats[1]), 1.0)
        out = {"loss": float(stats[0]) / count, "examples": float(stats[1])}
        at = 2
        for metric, spec in zip(self.metrics, self._layout):
            state = []
            for shape, dtype in spec:
                n = _size(shape)
                state.append(np.asarray(stats[at : at + n]).reshape(shape).astype(dtype))
                at += n
            out.update(_scalars(metric.name, metric.stateless_result(state)))
        return out


def _scalars(name: str, value) -> dict[str, float]:
    """A metric's result as scalars: a vector gives ``name_0``, ``name_1``, ..."""
    import numpy as np

    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            out.update(_scalars(f"{name}_{key}", v))
        return out
    array = np.asarray(value, np.float64).reshape(-1)
    if array.size == 1:
        return {name: float(array[0])}
    return {f"{name}_{i}": float(v) for i, v in enumerate(array)}


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def build_scorer(task, config, model, batch) -> Scorer:
    """The task's loss and metrics, checked against the model's outputs on
    ``batch`` (see :func:`check_fit`)."""
    loss = resolve_loss(task, config, model)
    metrics = resolve_metrics(task, config, model, loss)
    check_fit(type(task).__name__, model, loss, metrics, batch)
    return Scorer(loss, metrics)


def _head_activation(model) -> str | None:
    """The activation of the model's last layer, where it has one."""
    import keras

    try:
        last = model.layers[-1]
    except (AttributeError, IndexError):
        return None
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", None)


def check_fit(name: str, model, loss, metrics, batch) -> None:
    """The loss and the metrics on the untrained model's outputs for one
    batch: ConfigError or DataError for outputs that do not fit the loss
    (a softmax head under a from-logits loss, probabilities expected but not
    given), labels out of the loss's range or shape, or a loss that fails."""
    import numpy as np
    import tensorflow as tf

    features, labels = batch[0], batch[1]
    weights = batch[2] if len(batch) == 3 else None
    outputs = call_user(f"{name}: the model's call", model, features, training=False)
    if not isinstance(outputs, tf.Tensor) and not hasattr(outputs, "shape"):
        raise ConfigError(
            f"{name}: the model returns {type(outputs).__name__}: tftrain trains models "
            "with one output tensor."
        )
    out = np.asarray(tf.cast(outputs, tf.float32))
    kind, logits = _loss_kind(loss), from_logits(loss)
    if kind != "other" and logits is True:
        head = _head_activation(model)
        rows_sum_to_one = (
            out.ndim >= 2
            and out.shape[-1] > 1
            and out.min() >= 0
            and np.allclose(out.sum(-1), 1.0, atol=1e-3)
        )
        if head in ("softmax", "sigmoid") or rows_sum_to_one:
            raise ConfigError(
                f"{name}: the model ends in a {head or 'softmax'} but the loss "
                f"({type(loss).__name__}) expects logits (from_logits=True): drop the "
                "activation of the last layer, or use the loss with from_logits=False."
            )
    if kind != "other" and logits is False and (out.min() < 0 or out.max() > 1):
        raise ConfigError(
            f"{name}: the loss ({type(loss).__name__}) expects probabilities "
            f"(from_logits=False), but the model outputs values in [{out.min():.3g}, "
            f"{out.max():.3g}]: end the model in a softmax/sigmoid, or use from_logits=True."
        )
    y = np.asarray(labels)
    if y.dtype.kind in "SUO":
        raise DataError(
            f"{name}: the labels are strings ({y.reshape(-1)[:3]} ...): the loss "
            f"({type(loss).__name__}) takes numbers; map them to class numbers in "
            "build_inputs (for example with tf.keras.layers.StringLookup)."
        )
    if kind == "sparse":
        classes = out.shape[-1]
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise DataError(
                f"{name}: the labels are fractions ({y.reshape(-1)[:3]} ...) but the loss "
                f"({type(loss).__name__}) takes class numbers."
            )
        if y.size and (y.min() < 0 or y.max() >= classes):
            bad = y.min() if y.min() < 0 else y.max()
            raise DataError(
                f"{name}: a label is {bad:g}, but the model outputs {classes} classes: "
                f"expected labels 0-{classes - 1}."
            )
    try:
        value = loss(labels, outputs, sample_weight=weights)
    except Exception as e:  # noqa: BLE001 - shapes that do not fit, said in one line
        first = first_line(e)[:300]
        raise DataError(
            f"{name}: the loss ({type(loss).__name__}) cannot score the model's outputs "
            f"{list(outputs.shape)} against labels {list(labels.shape)} ({first})."
        ) from None
    if not np.isfinite(float(value)):
        raise DataError(
            f"{name}: the loss of the untrained model on the first batch is {float(value)}: "
            "check the inputs and labels (NaN in the data?)."
        )
    for metric in metrics:
        try:
            metric.update_state(labels, outputs, sample_weight=weights)  # builds lazy state
            metric.result()
        except Exception as e:  # noqa: BLE001 - a metric that cannot score these outputs
            raise UserCodeError(f"{name}: metric {metric.name!r}", e) from e
        finally:
            metric.reset_state()


# -- the built-in classification task ---------------------------------------


class Classification(Task):
    """tftrain's own models (``--model``) on its own datasets (``--dataset``):
    images or token ids to class logits, softmax cross-entropy, accuracy.

    The data are held in memory and the training order is a function of
    ``(seed, step)`` (:func:`tftrain.data.train_dataset`).
    """

    _positions_by_step = True

    def __init__(self):
        self._loaded = {}

    def dataset(self, config):
        from tftrain import data

        key = (config.dataset, config.data_dir, config.seed)
        if key not in self._loaded:
            self._loaded = {key: data.load(config.dataset, config.data_dir, seed=config.seed)}
        return self._loaded[key]

    def splits(self, config):
        dataset = self.dataset(config)
        return (
            dataset.train.take(config.max_train_examples),
            dataset.test.take(config.max_eval_examples),
        )

    def check_data(self, config) -> None:
        """The model fits the data and the machine's memory."""
        from tftrain import models, plugins, resources

        dataset = self.dataset(config)
        models.check_fits(config.model, dataset)
        models.check_memory(
            config.model,
            OPTIMIZER_SLOTS.get(config.optimizer, 2),
            # A mode whose variables live on other machines (parameter servers)
            # is not bound by this one's memory.
            resources.available_memory()
            if plugins.STRATEGIES.get(config.strategy).holds_variables
            else None,
            input_shape=dataset.image_shape,
            num_classes=dataset.num_classes,
            hidden_units=config.mlp_hidden_units,
            vocab_size=dataset.vocab_size,
        )

    def build_model(self, config):
        from tftrain import models

        dataset = self.dataset(config)
        return models.build_model(
            config.model,
            input_shape=dataset.image_shape,
            num_classes=dataset.num_classes,
            seed=config.seed,
            hidden_units=config.mlp_hidden_units,
            vocab_size=dataset.vocab_size,
            embedding_shards=config.embedding_shards or 1,
        )

    def build_inputs(self, config, context, training: bool):
        from tftrain import data

        train, test = self.splits(config)
        if training:
            return data.train_dataset(
                train,
                global_batch_size=config.batch_size,
                seed=config.seed,
                start_step=getattr(context, "start_step", 0),
                num_shards=context.num_input_pipelines,
                shard_index=context.input_pipeline_id,
                replicas=max(1, context.num_replicas_in_sync // context.num_input_pipelines),
            )
        per_replica = max(1, config.eval_batch_size // context.num_replicas_in_sync)
        return data.eval_dataset(
            test.shard(context.num_input_pipelines, context.input_pipeline_id),
            batch_size=per_replica,
        )

    def steps_per_epoch(self, config) -> int:
        from tftrain import data

        return data.steps_per_epoch(len(self.splits(config)[0]), config.batch_size)

    def build_loss(self, config):
        return SparseSoftmaxCrossEntropy(name="loss")

    def build_metrics(self, config):
        import keras

        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def describe(self, config) -> dict[str, Any]:
        return {"dataset": self.dataset(config).name, "model": config.model}


@functools.cache
def _sparse_softmax_class():
    import keras

    class SparseSoftmaxCrossEntropy(keras.losses.Loss):
        """Softmax cross-entropy of integer labels and logits, as TensorFlow computes it."""

        def call(self, y_true, y_pred):
            import tensorflow as tf

            return tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(y_true, tf.int32), logits=tf.cast(y_pred, tf.float32)
            )

        def get_config(self):
            return {**super().get_config(), "from_logits": True}

    return SparseSoftmaxCrossEntropy


def SparseSoftmaxCrossEntropy(**kwargs):  # noqa: N802 - a class made on first use
    return _sparse_softmax_class()(**kwargs)


# Optimizer state per parameter, for the memory estimate (default: 2).
OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adagrad": 1, "adam": 2}


def from_config(config) -> Task:
    """A new instance of the config's task: a Task subclass, or a registered name."""
    from tftrain import plugins

    task = config.task
    if isinstance(task, str):
        task = plugins.TASKS.get(task)
    if isinstance(task, Task):
        return task
    return call_user(f"{getattr(task, '__name__', task)}()", task)


def classification_scorer() -> Scorer:
    """The built-in task's scorer: softmax cross-entropy of logits, accuracy."""
    import keras

    return Scorer(
        SparseSoftmaxCrossEntropy(name="loss"),
        [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )

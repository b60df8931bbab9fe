"""Every private TensorFlow or Keras API tftrain uses, and nothing else.

Each function names what it relies on; ``tests/test_internal.py`` checks
each one against the installed versions, so an upgrade that changes one
fails there with a message that says which, not somewhere deep in a run.
"""

from __future__ import annotations

import types


def disable_thread_spinning() -> None:
    """Stops idle TensorFlow pool threads from spinning for work.

    ``ConfigProto.experimental.disable_thread_spinning`` has no ``tf.config``
    setter; the eager context builds its session config from its private
    ``_config``. Call before any other TensorFlow work.
    """
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    ctx = context.context()
    config = config_pb2.ConfigProto()
    if getattr(ctx, "_config", None) is not None:
        config.CopyFrom(ctx._config)
    config.experimental.disable_thread_spinning = True
    ctx._config = config


CPU_POOL_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"


def pool_cpu_memory() -> None:
    """Makes TensorFlow's CPU allocator a pool (its best-fit-with-coalescing
    allocator) instead of a malloc per tensor: ``TF_CPU_ALLOCATOR_USE_BFC``,
    an environment variable TensorFlow reads once, when it first allocates
    on the CPU, and does not document. A value the user set is kept.

    With malloc, a step under a ``tf.distribute`` strategy got its large
    temporaries (a convolution's backward pass) from fresh mappings of
    glibc's per-thread arenas, zero-filled page by page, every step: 8,000
    page faults a step for the CNN, a ResNet's step under ``mirrored`` 2.4x
    slower (BUILD_NOTES.md, "round five"). Call before any other
    TensorFlow work; later it changes nothing."""
    import os

    os.environ.setdefault(CPU_POOL_VARIABLE, "true")
    # The pool stops at 64 GiB unless told (malloc had no cap): on a larger
    # machine, its memory.
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 0
    if total > 64 << 30:
        os.environ.setdefault("TF_CPU_BFC_MEM_LIMIT_IN_MB", str(total >> 20))


def cpu_memory_pooled() -> bool:
    """Whether TensorFlow's CPU allocator is the pool (only its allocators
    keep the statistics ``get_memory_info`` reads)."""
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return False
    return True


def onednn_enabled() -> bool:
    """Whether this process runs TensorFlow's oneDNN CPU kernels (built with
    them and turned on: ``_pywrap_util_port.IsMklEnabled``)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def thread_spinning_disabled() -> bool:
    from tensorflow.python.eager import context

    config = getattr(context.context(), "_config", None)
    return bool(config is not None and config.experimental.disable_thread_spinning)


def make_iteration_count_atomic(optimizer) -> None:
    """Makes ``optimizer.iterations.assign_add`` add in place.

    Keras's ``Variable.assign_add`` is ``assign(self + value)``: a read, then
    a write. Under asynchronous parameter-server training two workers can
    read the same count and both write count + 1, losing a step. The
    resource op underneath (AssignAddVariableOp) adds in place. Relies on
    Keras's private ``Optimizer._iterations``.
    """
    import tensorflow as tf

    def assign_add(self, value):
        variable = self.value
        context = tf.distribute.get_replica_context()
        if isinstance(value, int) and context is not None and context.num_replicas_in_sync > 1:
            # Every replica counts the same step. In replica context an update
            # of this ONLY_FIRST_REPLICA variable broadcasts replica 0's value
            # to every worker: a collective per step. Adding the constant to
            # each local copy from cross-replica context needs no communication.
            return context.merge_call(lambda _: variable.assign_add(value))
        return variable.assign_add(tf.cast(value, variable.dtype))

    counter = optimizer._iterations
    counter.assign_add = types.MethodType(assign_add, counter)


def variable_index(optimizer, variable) -> int:
    """The position of ``variable``'s slots in the optimizer's slot lists
    (Keras's private ``Optimizer._get_variable_index``)."""
    return optimizer._get_variable_index(variable)


# The Keras TensorFlow-backend method that sums gradients across replicas
# before the update; an optimizer overrides it to sum them another way.
GRADIENT_SUM_METHOD = "_all_reduce_sum_gradients"


def install_gradient_sum_hook(cls, reduce) -> None:
    """Overrides ``GRADIENT_SUM_METHOD`` on ``cls`` (a Keras optimizer class):
    gradients are summed by ``reduce(self, grads_and_vars, keras_sum)``, which
    may call ``keras_sum(grads_and_vars)``, Keras's own method. It runs in
    replica context, just before the update: what it returns is applied."""
    keras_method = getattr(cls.__mro__[1], GRADIENT_SUM_METHOD)

    def method(self, grads_and_vars):
        return reduce(self, grads_and_vars, lambda pairs: keras_method(self, pairs))

    setattr(cls, GRADIENT_SUM_METHOD, method)


def cross_device_ops(strategy):
    """The cross-device reduction a MirroredStrategy uses (private attribute)."""
    return strategy.extended._cross_device_ops


def trace_op_events(xplane_path: str):
    """The TensorFlow op executions of a profiler trace (the ``.xplane.pb``
    that ``tf.profiler.experimental.stop`` writes): ``(thread, name,
    start_ns, duration_ns)`` for each event on an executor thread
    (``tf_Compute...``) of the host plane, in no particular order.

    The XSpace proto is TensorFlow's (``tensorflow.tsl.profiler.protobuf``),
    with no public reader; TensorBoard's profile plugin reads the same file.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                yield (
                    line.name,
                    names.get(event.metadata_id, "?"),
                    line.timestamp_ns + event.offset_ps // 1000,
                    event.duration_ps // 1000,
                )


def compiled_metrics(model) -> list | None:
    """The metrics a model was compiled with, as given to ``compile``
    (``metrics`` then ``weighted_metrics``); None if it was not compiled
    with any. Keras keeps them only in its private ``_compile_config``
    (``get_compile_config`` serializes them)."""
    held = getattr(model, "_compile_config", None)
    config = getattr(held, "config", None)
    if not isinstance(config, dict):
        return None
    given = []
    for key in ("metrics", "weighted_metrics"):
        value = config.get(key)
        if isinstance(value, dict):  # per output: refused by the caller
            return value
        given.extend(value or [])
    return given or None


def move_variable(variable, device: str) -> None:
    """Moves a Keras variable's storage to ``device``: a new ``tf.Variable``
    there, holding its value, becomes the Keras variable's private
    ``_value`` (what its ``value`` and ``handle`` read). The Keras variable
    stays the same object, so the layer, the checkpoints and the export
    see no change; a pipeline places any layer this way, without cloning it.
    """
    import tensorflow as tf

    old = variable._value
    with tf.init_scope(), tf.device(device):
        moved = tf.Variable(
            old.read_value(),
            trainable=old.trainable,
            name=old.name.split(":")[0],
            dtype=old.dtype,
            aggregation=old.aggregation,
            synchronization=old.synchronization,
        )
    variable._value = moved


def all_layers(model) -> list:
    """Every layer inside ``model``: nested models' and the sublayers that
    custom layers hold as attributes (Keras's private ``_flatten_layers``;
    ``model.layers`` lists the top level only)."""
    return list(model._flatten_layers(include_self=False, recursive=True))

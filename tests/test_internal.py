"""Every private TensorFlow/Keras API behind tftrain._internal, checked against
the installed versions: a failure here names what an upgrade changed."""

import inspect
import os
import platform
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT
from tftrain import _internal, optimizers


def test_thread_spinning_can_be_turned_off_before_tensorflow_starts():
    code = (
        "from tftrain import _internal; _internal.disable_thread_spinning(); "
        "import tensorflow as tf; tf.constant(1.0) + 1; "
        "print(_internal.thread_spinning_disabled())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip().endswith("True"), (
        "TensorFlow's eager context no longer takes ConfigProto from its private _config: "
        f"tftrain._internal.disable_thread_spinning needs another way.\n{out.stderr[-2000:]}"
    )


def _last_line(argv, env) -> list:
    """The last line a child printed (as a list of at most one), or its stderr's tail."""
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1:] or [out.stderr[-2000:]]


def test_tensorflow_pools_cpu_memory_when_asked_before_it_starts():
    code = (
        "import os, sys; from tftrain import _internal\n"
        "if sys.argv[1] == 'pool': _internal.pool_cpu_memory()\n"
        "import tensorflow as tf; tf.ones([100, 100]) + 1\n"
        "print(_internal.cpu_memory_pooled())"
    )
    env = {k: v for k, v in os.environ.items() if k != _internal.CPU_POOL_VARIABLE}
    # Without oneDNN, whose own CPU allocator (a pool too) would be the default.
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    said = {}
    for how in ("pool", "malloc"):
        said[how] = _last_line([sys.executable, "-c", code, how], env)
    assert said == {"pool": ["True"], "malloc": ["False"]}, (
        f"TensorFlow no longer reads {_internal.CPU_POOL_VARIABLE} (or its CPU allocator's "
        f"statistics moved): tftrain._internal.pool_cpu_memory needs another way. {said}"
    )


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="tftrain turns oneDNN on by default on x86-64 Linux only",
)
def test_importing_tftrain_first_runs_onednn_unless_the_user_said_no():
    code = (
        "import tftrain, tensorflow as tf; from tftrain import _internal; "
        "tf.constant(1.0) + 1; print(_internal.onednn_enabled())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    said = {}
    for setting in (None, "0"):
        run_env = env if setting is None else dict(env, TF_ENABLE_ONEDNN_OPTS=setting)
        said[setting] = _last_line([sys.executable, "-c", code], run_env)
    assert said == {None: ["True"], "0": ["False"]}, (
        "TensorFlow no longer turns oneDNN on from TF_ENABLE_ONEDNN_OPTS, or no longer "
        f"reports it through _pywrap_util_port.IsMklEnabled: tftrain/__init__.py and "
        f"tftrain._internal.onednn_enabled need another way. {said}"
    )


def test_a_cpu_allocator_the_user_chose_is_kept(monkeypatch):
    monkeypatch.setenv(_internal.CPU_POOL_VARIABLE, "false")
    _internal.pool_cpu_memory()
    assert os.environ[_internal.CPU_POOL_VARIABLE] == "false"
    monkeypatch.delenv(_internal.CPU_POOL_VARIABLE)
    _internal.pool_cpu_memory()
    assert os.environ[_internal.CPU_POOL_VARIABLE] == "true"


def test_the_iteration_counter_adds_in_place():
    optimizer = keras.optimizers.SGD(0.1)
    assert hasattr(optimizer, "_iterations"), "Keras renamed Optimizer._iterations"
    _internal.make_iteration_count_atomic(optimizer)

    @tf.function
    def count():
        optimizer.iterations.assign_add(1)

    ops = {op.type for op in count.get_concrete_function().graph.get_operations()}
    assert "AssignAddVariableOp" in ops and "AssignVariableOp" not in ops, ops
    count()
    assert int(optimizer.iterations.numpy()) == 1


def test_variable_index_finds_each_variable():
    variables = [keras.Variable(tf.zeros([2])), keras.Variable(tf.zeros([3]))]
    optimizer = keras.optimizers.Adam()
    optimizer.build(variables)
    assert [_internal.variable_index(optimizer, v) for v in variables] == [0, 1]


def test_keras_sums_gradients_through_the_hooked_method():
    from keras.src.backend.tensorflow.optimizer import TFOptimizer

    assert hasattr(TFOptimizer, _internal.GRADIENT_SUM_METHOD), (
        f"Keras's TensorFlow optimizer lost {_internal.GRADIENT_SUM_METHOD}: tftrain's "
        "gradient ring cannot take over the all-reduce"
    )
    source = inspect.getsource(TFOptimizer._backend_update_step)
    assert _internal.GRADIENT_SUM_METHOD in source, (
        "Keras no longer sums gradients in _backend_update_step through "
        f"{_internal.GRADIENT_SUM_METHOD}"
    )


def test_the_hook_sums_with_the_reducer_in_replica_context():
    class Doubling:
        def reduce_in_graph(self, gradients):
            return [2 * g for g in gradients]

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        variable = tf.Variable([1.0, 1.0])
        optimizer = optimizers.SGD(learning_rate=1.0)
        optimizer.build([variable])
    optimizer.gradient_reducer = Doubling()

    @tf.function
    def step():
        strategy.run(lambda: optimizer.apply_gradients([(tf.constant([1.0, 2.0]), variable)]))

    step()
    assert variable.numpy().tolist() == [-1.0, -3.0]


def test_cross_device_ops_of_a_mirrored_strategy():
    ops = tf.distribute.ReductionToOneDevice()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=ops)
    assert _internal.cross_device_ops(strategy) is ops


def test_trace_op_events_reads_a_profiler_trace(tmp_path):
    a = tf.random.stateless_normal([256, 256], seed=[1, 2])

    @tf.function
    def products(n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            total += tf.reduce_sum(tf.matmul(a, a))
        return total

    products(tf.constant(2))
    tf.profiler.experimental.start(str(tmp_path))
    try:
        products(tf.constant(20)).numpy()
    finally:
        tf.profiler.experimental.stop()
    (trace,) = tmp_path.glob("plugins/profile/*/*.xplane.pb")
    matmuls = [e for e in _internal.trace_op_events(str(trace)) if "MatMul" in e[1]]
    assert len(matmuls) >= 20, (
        "no MatMul ops on the executor threads of a profiler trace: the XSpace proto "
        "(tensorflow.tsl.profiler.protobuf.xplane_pb2) or its thread names changed, "
        "and tftrain._internal.trace_op_events needs another way"
    )
    assert all(duration > 0 and start > 0 for _, _, start, duration in matmuls)


def test_compiled_metrics_are_read_back_as_given():
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert _internal.compiled_metrics(model) is None, "an uncompiled model has no metrics"
    mae = keras.metrics.MeanAbsoluteError(name="mae")
    model.compile(loss="mse", metrics=["accuracy", mae], weighted_metrics=["mse"])
    assert _internal.compiled_metrics(model) == ["accuracy", mae, "mse"], (
        "Keras no longer keeps compile()'s metrics in model._compile_config.config"
    )


def test_a_keras_variable_moves_to_another_device_as_the_same_object():
    layer = keras.layers.Dense(3)
    layer.build((None, 2))
    kernel = layer.kernel
    before = kernel.numpy()
    _internal.move_variable(kernel, "/cpu:1")
    assert layer.kernel is kernel, "the layer still holds the same Keras variable"
    assert kernel.value.device.endswith("CPU:1"), (
        "Keras's TensorFlow Variable no longer reads its storage from _value"
    )
    assert kernel.handle.device.endswith("CPU:1")
    np.testing.assert_array_equal(kernel.numpy(), before)
    kernel.assign(before + 1)
    np.testing.assert_array_equal(layer(np.ones((1, 2), "float32")).numpy().shape, (1, 3))
    np.testing.assert_array_equal(kernel.numpy(), before + 1)


def test_all_layers_finds_the_sublayers_of_custom_layers_and_nested_models():
    import keras

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.norm = keras.layers.BatchNormalization()

        def call(self, x):
            return self.norm(x)

    inner = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    inputs = keras.Input((3,))
    model = keras.Model(inputs, inner(Block()(inputs)))
    norms = [
        layer
        for layer in _internal.all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(norms) == 2, "Keras's _flatten_layers no longer reaches nested layers"

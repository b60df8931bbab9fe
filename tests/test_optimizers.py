"""tftrain's optimizers against independent NumPy versions of the published
rules, against Keras's built-in classes, and through save/restore."""

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from tftrain import optimizers

STEPS = 100


# -- independent references (NumPy, written from the papers) ---------------


class NumpyRule:
    """One published update rule over NumPy arrays, in the given float dtype."""

    def __init__(self, name, dtype=np.float32, **hp):
        self.name, self.dtype, self.hp, self.state, self.t = name, dtype, hp, {}, 0

    def c(self, x):
        return self.dtype(x)

    def step(self, w, g, rows=None):
        """Updates w in place; ``rows``: only those rows (a lazy sparse update)."""
        self.t += 1
        hp, c = self.hp, self.c
        sel = slice(None) if rows is None else rows
        g = g.astype(self.dtype)
        lr = c(hp["learning_rate"])
        if self.name == "sgd":
            w[sel] -= lr * g
        elif self.name == "momentum":
            v = self.state.setdefault("v", np.zeros_like(w))
            mu = c(hp["momentum"])
            v[sel] = mu * v[sel] - lr * g
            w[sel] += (mu * v[sel] - lr * g) if hp.get("nesterov") else v[sel]
        elif self.name == "adagrad":
            acc = self.state.setdefault("acc", np.full_like(w, c(hp.get("init", 0.1))))
            eps = c(hp.get("epsilon", 1e-7))
            acc[sel] += g * g
            if hp.get("inside", True):
                w[sel] -= lr * g / np.sqrt(acc[sel] + eps)
            else:
                w[sel] -= lr * g / (np.sqrt(acc[sel]) + eps)
        elif self.name == "adam":
            b1, b2, eps = c(hp.get("beta_1", 0.9)), c(hp.get("beta_2", 0.999)), c(1e-7)
            m = self.state.setdefault("m", np.zeros_like(w))
            v = self.state.setdefault("v", np.zeros_like(w))
            m[sel] = b1 * m[sel] + (c(1) - b1) * g
            v[sel] = b2 * v[sel] + (c(1) - b2) * g * g
            alpha = lr * np.sqrt(c(1) - b2 ** c(self.t)) / (c(1) - b1 ** c(self.t))
            denom = v[sel]
            if hp.get("amsgrad"):
                vh = self.state.setdefault("vh", np.zeros_like(w))
                vh[sel] = np.maximum(vh[sel], v[sel])
                denom = vh[sel]
            w[sel] -= alpha * m[sel] / (np.sqrt(denom) + eps)


CASES = {
    "sgd": (
        dict(learning_rate=0.1),
        lambda: optimizers.get("sgd", learning_rate=0.1),
        lambda: keras.optimizers.SGD(0.1),
    ),
    "momentum": (
        dict(learning_rate=0.05, momentum=0.9),
        lambda: optimizers.get("momentum", learning_rate=0.05),
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    ),
    "nesterov": (
        dict(learning_rate=0.05, momentum=0.8, nesterov=True),
        lambda: optimizers.SGD(0.05, momentum=0.8, nesterov=True),
        lambda: keras.optimizers.SGD(0.05, momentum=0.8, nesterov=True),
    ),
    "adagrad": (
        dict(learning_rate=0.1),
        lambda: optimizers.get("adagrad", learning_rate=0.1),
        lambda: keras.optimizers.Adagrad(0.1),
    ),
    "adam": (
        dict(learning_rate=0.01),
        lambda: optimizers.get("adam", learning_rate=0.01),
        lambda: keras.optimizers.Adam(0.01),
    ),
    "amsgrad": (
        dict(learning_rate=0.01, amsgrad=True),
        lambda: optimizers.Adam(0.01, amsgrad=True),
        lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    ),
}
RULE = {
    "sgd": "sgd",
    "momentum": "momentum",
    "nesterov": "momentum",
    "adagrad": "adagrad",
    "adam": "adam",
    "amsgrad": "adam",
}
# (40, 30): 1,200 elements, where Adam on a CPU runs as elementwise ops
# rather than its fused kernel (tftrain.optimizers.adam).
SHAPES = [(7,), (5, 3), (2, 3, 4), (40, 30)]


def relative_error(got, want):
    """Largest difference, relative to the largest magnitude of the reference."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


def gradients(shape, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for _ in range(STEPS)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_numpy_reference_float32(case, shape):
    hp, make, _ = CASES[case]
    init = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    var = keras.Variable(init)
    opt = make()
    ref, w = NumpyRule(RULE[case], **hp), init.copy()
    for g in gradients(shape, 2):
        opt.apply_gradients([(tf.constant(g), var)])
        ref.step(w, g)
    assert relative_error(var.numpy(), w) <= 1e-6
    assert int(opt.iterations.numpy()) == STEPS


@pytest.mark.parametrize("case", CASES)
def test_dense_matches_keras_builtin(case):
    _, make, make_keras = CASES[case]
    init = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    ours, theirs = keras.Variable(init), keras.Variable(init)
    a, b = make(), make_keras()
    for g in gradients((6, 4), 4):
        a.apply_gradients([(tf.constant(g), ours)])
        b.apply_gradients([(tf.constant(g), theirs)])
    assert relative_error(ours.numpy(), theirs.numpy()) <= 1e-6


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-2), ("bfloat16", 5e-2)])
@pytest.mark.parametrize("case", CASES)
def test_low_precision_tracks_keras_and_reference(case, dtype, tolerance):
    hp, make, make_keras = CASES[case]
    init = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
    ours, theirs = keras.Variable(init, dtype=dtype), keras.Variable(init, dtype=dtype)
    a, b = make(), make_keras()
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).type
    # The reference rounds every operation to the same precision.
    ref, w = NumpyRule(RULE[case], dtype=np_dtype, **hp), init.astype(np_dtype)
    for g in gradients((8, 3), 6)[:30]:
        gt = tf.cast(tf.constant(g), dtype)
        a.apply_gradients([(gt, ours)])
        b.apply_gradients([(gt, theirs)])
        ref.step(w, gt.numpy())
    assert ours.dtype == dtype
    assert relative_error(ours.numpy(), theirs.numpy()) <= tolerance
    assert relative_error(ours.numpy(), w) <= tolerance


def test_adagrad_epsilon_outside_the_root_is_duchis_form():
    init = np.full((4,), 1.0, np.float32)
    var = keras.Variable(init)
    opt = optimizers.Adagrad(
        0.1, initial_accumulator_value=0.0, epsilon=1e-3, epsilon_inside_sqrt=False
    )
    ref = NumpyRule("adagrad", learning_rate=0.1, init=0.0, epsilon=1e-3, inside=False)
    w = init.copy()
    for g in gradients((4,), 7):
        opt.apply_gradients([(tf.constant(g), var)])
        ref.step(w, g)
    assert relative_error(var.numpy(), w) <= 1e-6


def test_epsilon_placement_matters_for_tiny_gradients():
    """With an empty accumulator the two conventions differ by orders of magnitude."""
    steps = {}
    for inside in (True, False):
        var = keras.Variable(np.zeros((1,), np.float32))
        opt = optimizers.Adagrad(
            1.0, initial_accumulator_value=0.0, epsilon=1e-7, epsilon_inside_sqrt=inside
        )
        opt.apply_gradients([(tf.constant([1e-5]), var)])
        steps[inside] = abs(float(var.numpy()[0]))
    assert steps[False] > 0.9 and steps[True] < 0.05


# -- sparse gradients --------------------------------------------------------


def sparse_gradients(rows, cols, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        idx = rng.integers(0, rows, size=6)  # repeats on purpose
        out.append((idx.astype(np.int32), rng.normal(size=(6, cols)).astype(np.float32)))
    return out


def dense_of(idx, values, rows):
    dense = np.zeros((rows, values.shape[1]), np.float32)
    np.add.at(dense, idx, values)
    return dense


@pytest.mark.parametrize("case", CASES)
def test_sparse_updates_touch_only_their_rows_as_the_dense_rule_would(case):
    hp, make, _ = CASES[case]
    rows, cols = 12, 3
    init = np.random.default_rng(8).normal(size=(rows, cols)).astype(np.float32)
    var = keras.Variable(init)
    opt = make()
    ref, w = NumpyRule(RULE[case], **hp), init.copy()
    for idx, values in sparse_gradients(rows, cols, 9):
        before = var.numpy().copy()
        opt.apply_gradients(
            [
                (
                    tf.IndexedSlices(
                        tf.constant(values), tf.constant(idx), tf.constant([rows, cols])
                    ),
                    var,
                )
            ]
        )
        touched = np.unique(idx)
        untouched = np.setdiff1d(np.arange(rows), touched)
        np.testing.assert_array_equal(var.numpy()[untouched], before[untouched])
        # The reference applies the dense rule to the touched rows only.
        ref.step(w, dense_of(idx, values, rows)[touched], rows=touched)
    assert relative_error(var.numpy(), w) <= 1e-6


@pytest.mark.parametrize("case", ["sgd", "adagrad"])
def test_sparse_equals_dense_exactly_where_untouched_rows_do_not_move(case):
    _, make, _ = CASES[case]
    rows, cols = 10, 2
    init = np.random.default_rng(10).normal(size=(rows, cols)).astype(np.float32)
    sparse_var, dense_var = keras.Variable(init), keras.Variable(init)
    a, b = make(), make()
    for idx, values in sparse_gradients(rows, cols, 11)[:20]:
        a.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(idx)), sparse_var)])
        b.apply_gradients([(tf.constant(dense_of(idx, values, rows)), dense_var)])
    assert relative_error(sparse_var.numpy(), dense_var.numpy()) <= 1e-6


def test_embedding_gradients_take_the_sparse_path():
    model = keras.Sequential([keras.Input((50,), dtype="int32"), keras.layers.Embedding(50, 4)])
    opt = optimizers.Adam(0.1)

    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(tf.constant([ids])))
        grads = tape.gradient(loss, model.trainable_weights)
        assert isinstance(grads[0], tf.IndexedSlices)
        opt.apply_gradients(zip(grads, model.trainable_weights))

    step(list(range(50)))  # every row now has momentum: a dense step would move all
    before = model.trainable_weights[0].numpy().copy()
    step([1, 2, 2] + [1] * 47)
    changed = np.flatnonzero(np.any(model.trainable_weights[0].numpy() != before, axis=1))
    assert changed.tolist() == [1, 2]


# -- configuration, saving, restoring --------------------------------------


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_get_config_round_trip(name):
    opt = optimizers.get(name, learning_rate=0.123, clipnorm=1.5)
    config = opt.get_config()
    again = type(opt).from_config(config)
    assert again.get_config() == config
    assert config["learning_rate"] == pytest.approx(0.123) and config["clipnorm"] == 1.5


def test_get_defaults_follow_keras():
    assert optimizers.get("momentum").momentum == 0.9
    assert optimizers.get("sgd").momentum == 0.0
    ours, theirs = optimizers.get("adam").get_config(), keras.optimizers.Adam().get_config()
    for key in ("beta_1", "beta_2", "epsilon", "amsgrad", "learning_rate"):
        assert ours[key] == theirs[key]
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        optimizers.get("rmsprop")


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_save_and_load_a_compiled_model(tmp_path, name):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=optimizers.get(name, learning_rate=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = np.random.default_rng(0).normal(size=(16, 4)), np.arange(16) % 3
    model.train_on_batch(x, y)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("name", ["momentum", "adagrad", "adam"])
def test_checkpoint_resume_continues_the_same_trajectory(tmp_path, name):
    init = np.random.default_rng(12).normal(size=(5, 2)).astype(np.float32)
    grads = gradients((5, 2), 13)[:20]
    var = keras.Variable(init)
    opt = optimizers.get(name, learning_rate=0.05)
    ckpt = tf.train.Checkpoint(var=var, optimizer=opt)
    for g in grads[:10]:
        opt.apply_gradients([(tf.constant(g), var)])
    path = ckpt.save(str(tmp_path / "c"))
    for g in grads[10:]:
        opt.apply_gradients([(tf.constant(g), var)])
    straight = var.numpy().copy()

    var2 = keras.Variable(np.zeros_like(init))
    opt2 = optimizers.get(name, learning_rate=0.05)
    opt2.build([var2])
    tf.train.Checkpoint(var=var2, optimizer=opt2).restore(path).assert_consumed()
    assert int(opt2.iterations.numpy()) == 10
    for g in grads[10:]:
        opt2.apply_gradients([(tf.constant(g), var2)])
    np.testing.assert_array_equal(var2.numpy(), straight)


def test_iteration_counter_adds_in_place():
    """Keras's Variable.assign_add is a read then a write, which loses counts
    under concurrent parameter-server updates; ours is one AssignAddVariableOp."""
    opt = optimizers.Adam()

    @tf.function
    def bump():
        opt.iterations.assign_add(1)

    ops = {op.type for op in bump.get_concrete_function().graph.get_operations()}
    assert "AssignAddVariableOp" in ops and "AssignVariableOp" not in ops
    bump()
    bump()
    assert int(opt.iterations.numpy()) == 2


def _adam_graph_ops(shape):
    var = keras.Variable(np.zeros(shape, np.float32))
    opt = optimizers.Adam()
    opt.build([var])
    graph = _graph_step(opt, var).get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize(
    "shape, fused", [((16, 16), True), ((2, 256), False), ((128, 128), False), ((129, 128), True)]
)
def test_adam_mid_sized_variables_on_cpu_run_as_elementwise_ops(shape, fused):
    """TensorFlow's CPU Adam kernel splits variables of 512 elements or more
    across threads, which costs more than the work below 16,384 elements."""
    ops = _adam_graph_ops(shape)
    assert ("ResourceApplyAdam" in ops) == fused
    assert ("AssignSubVariableOp" in ops) == (not fused)


def test_adam_keeps_its_fused_kernel_with_one_intra_op_thread(monkeypatch):
    """A pool of one thread splits nothing, and there the fused kernel wins."""
    monkeypatch.setattr(tf.config.threading, "get_intra_op_parallelism_threads", lambda: 1)
    assert "ResourceApplyAdam" in _adam_graph_ops((2, 256))


def _graph_step(opt, var):
    @tf.function
    def step(g):
        opt.apply_gradients([(g, var)])

    return step


def test_adam_elementwise_ops_follow_the_fused_kernel(monkeypatch):
    """Both ways give the same moments bit for bit and the same weights
    within a unit in the last place, over 100 steps."""
    from tftrain.optimizers import adam

    init = np.random.default_rng(7).normal(size=(40, 30)).astype(np.float32)
    results = []
    for sizes in (adam._ELEMENTWISE_SIZES, range(0)):
        monkeypatch.setattr(adam, "_ELEMENTWISE_SIZES", sizes)
        var, opt = keras.Variable(init), optimizers.Adam(0.01)
        opt.build([var])
        step = _graph_step(opt, var)
        for g in gradients((40, 30), 8):
            step(tf.constant(g))
        slots = [s.numpy() for s in opt.variables if s.shape == var.shape]
        results.append((var.numpy(), slots))
    (w_a, slots_a), (w_b, slots_b) = results
    assert len(slots_a) == 2
    for a, b in zip(slots_a, slots_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_max_ulp(w_a, w_b, maxulp=2)
    assert not np.array_equal(w_a, init)


def test_warmup_cosine_and_step_schedules():
    s = optimizers.WarmupDecay(1.0, warmup_steps=4, decay="cosine", total_steps=14)
    values = [float(s(i)) for i in range(15)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0) and values[9] == pytest.approx(0.5)
    assert values[14] == pytest.approx(0.0, abs=1e-7)
    step = optimizers.WarmupDecay(0.4, decay="step", boundaries=[3, 6], decay_rate=0.5)
    assert [float(step(i)) for i in (0, 2, 3, 5, 6, 9)] == pytest.approx(
        [0.4, 0.4, 0.2, 0.2, 0.1, 0.1]
    )
    assert optimizers.scaled_learning_rate(0.1, 1024, 256) == pytest.approx(0.4)
    again = optimizers.WarmupDecay.from_config(s.get_config())
    assert float(again(9)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "extra",
    [{"weight_decay": 0.01}, {"clipnorm": 0.5}, {"clipvalue": 0.1}, {"global_clipnorm": 0.3}],
)
def test_base_class_arguments_behave_as_in_keras(extra):
    init = np.random.default_rng(14).normal(size=(6, 3)).astype(np.float32)
    ours, theirs = keras.Variable(init), keras.Variable(init)
    a, b = optimizers.Adam(0.01, **extra), keras.optimizers.Adam(0.01, **extra)
    for g in gradients((6, 3), 15)[:30]:
        a.apply_gradients([(tf.constant(g), ours)])
        b.apply_gradients([(tf.constant(g), theirs)])
    assert relative_error(ours.numpy(), theirs.numpy()) <= 1e-6
    assert a.get_config()[next(iter(extra))] == next(iter(extra.values()))

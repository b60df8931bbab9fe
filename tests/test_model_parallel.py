"""--strategy=model_parallel: stages on the test process's two logical CPU
devices (conftest), and on two launched processes."""

import itertools
import json
import random

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_tftrain

from tftrain import controller, pipeline
from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute.base import mode_for
from tftrain.distribute.cluster import parse_tf_config

# The order in which micro-batch gradients are summed differs from the whole
# batch's single sum: float32 round-off, measured below 1e-5 after 60 Adam steps.
TOLERANCE = 1e-4


# -- schedules ------------------------------------------------------------------


@pytest.mark.parametrize("kind", pipeline.SCHEDULES)
@pytest.mark.parametrize("K,M", [(1, 1), (2, 1), (2, 4), (3, 2), (4, 8), (4, 3)])
def test_every_schedule_runs_each_micro_batch_forward_then_backward_once(kind, K, M):
    stages = pipeline.schedule(kind, K, M)
    assert len(stages) == K
    for actions in stages:
        assert sorted(actions) == sorted(
            [("F", j) for j in range(M)] + [("B", j) for j in range(M)]
        )
        for j in range(M):
            assert actions.index(("F", j)) < actions.index(("B", j))
    order = pipeline.construction_order(stages)
    assert len(order) == 2 * K * M
    seen = set()
    for kind_, k, j in order:  # every action after the ones it needs
        if kind_ == "F" and k:
            assert ("F", k - 1, j) in seen
        if kind_ == "B":
            assert ("F", k, j) in seen and (k == K - 1 or ("B", k + 1, j) in seen)
        seen.add((kind_, k, j))


@pytest.mark.parametrize("K,M", [(2, 4), (4, 8), (3, 2), (4, 1)])
def test_1f1b_holds_fewer_micro_batches_than_gpipe(K, M):
    gpipe = [pipeline.peak_in_flight(a) for a in pipeline.schedule("gpipe", K, M)]
    one_f_one_b = [pipeline.peak_in_flight(a) for a in pipeline.schedule("1f1b", K, M)]
    assert gpipe == [M] * K
    assert one_f_one_b == [min(K - k, M) for k in range(K)]


def test_the_bubble_is_k_minus_1_over_m_plus_k_minus_1():
    assert pipeline.bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert pipeline.bubble_fraction(4, 1) == pytest.approx(3 / 4)


# -- partition --------------------------------------------------------------


def _brute_force(costs, K, holds=None):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), K - 1):
        bounds = [0, *cuts, n]
        if holds and not all(any(holds[a:b]) for a, b in zip(bounds, bounds[1:])):
            continue
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_the_partition_minimises_the_slowest_stage():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        K = rng.randint(1, n)
        costs = [rng.choice([0.0, 1.0, rng.random() * 10]) for _ in range(n)]
        bounds = pipeline.partition(costs, K)
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == K + 1
        assert all(a < b for a, b in zip(bounds, bounds[1:]))  # no empty stage
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert worst == pytest.approx(_brute_force(costs, K))


def test_no_stage_is_left_without_variables_where_a_cut_with_them_exists():
    # The cheapest cut puts only the variable-less first layer on stage 0.
    assert pipeline.partition([5, 5, 1, 1], 2) == [0, 1, 4]
    assert pipeline.partition([5, 5, 1, 1], 2, holds=[False, False, True, True]) == [0, 3, 4]
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 8)
        K = rng.randint(1, n)
        costs = [rng.random() * 10 for _ in range(n)]
        holds = [rng.random() < 0.4 for _ in range(n)]
        bounds = pipeline.partition(costs, K, holds=holds)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        if sum(holds) >= K:  # such a cut exists: taken, and the best of them
            assert all(any(holds[a:b]) for a, b in zip(bounds, bounds[1:])), (holds, bounds)
            assert worst == pytest.approx(_brute_force(costs, K, holds))
        else:
            assert worst == pytest.approx(_brute_force(costs, K))


def test_a_model_is_cut_only_where_one_tensor_crosses():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="first")(inputs)
    a = keras.layers.Dense(4, name="left")(x)
    b = keras.layers.Dense(4, name="right")(x)
    joined = keras.layers.Add(name="join")([a, b])
    skip = keras.layers.Add(name="skip")([joined, x])  # a residual around the branch
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(skip))
    pieces = pipeline.segments(model)
    assert [p.name for p in pieces] == ["first", "left_to_skip", "head"]
    x0 = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    y = x0
    for piece in pieces:
        y = piece(y)
    np.testing.assert_allclose(y, model(x0), rtol=1e-6)  # the same function, piece by piece
    only_branch = keras.Model(inputs, keras.layers.Add()([a, b]))
    assert len(pipeline.segments(only_branch)) == 2  # first, then the branch and its join


def test_models_that_cannot_be_cut_are_refused_with_the_reason():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ConfigError, match="subclassed"):
        pipeline.segments(Subclassed())
    a, b = keras.Input((2,)), keras.Input((2,))
    two = keras.Model([a, b], keras.layers.Add()([a, b]))
    with pytest.raises(ConfigError, match="2 input"):
        pipeline.segments(two)
    shared = keras.layers.Dense(2, name="shared")
    inputs = keras.Input((2,))
    twice = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(ConfigError, match="used more than once"):
        pipeline.segments(twice)


# -- training -----------------------------------------------------------------


def config(tmp_path, name, **changes):
    values = dict(
        dataset="synthetic",
        model="mlp",
        hidden_units=(64, 32),
        optimizer="adam",
        learning_rate=0.01,
        batch_size=48,
        train_steps=60,
        steps_per_loop=10,
        eval_interval=30,
        checkpoint_interval=30,
        export=False,
        model_dir=str(tmp_path / name),
    )
    values.update(changes)
    return ExperimentConfig(**values).validate()


def train(cfg, log=None):
    mode = mode_for(cfg)
    mode.setup()
    result = controller.run(cfg, mode, log=log or (lambda line: None))
    return result, mode


def weights(model_dir):
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.startswith("optimizer/_trainable_variables/")
    }


def test_two_stages_four_micro_batches_train_as_the_whole_model(tmp_path):
    # Balanced by parameters: timings of layers this small swing with what ran before.
    piped, mode = train(
        config(
            tmp_path,
            "piped",
            strategy="model_parallel",
            num_microbatches=4,
            pipeline_balance="params",
        )
    )
    whole, _ = train(config(tmp_path, "whole"))
    accumulated, _ = train(config(tmp_path, "acc", num_microbatches=4))
    assert piped["global_step"] == 60 and piped["num_stages"] == 2
    assert [s["device"] for s in piped["pipeline_stages"]] == ["/cpu:0", "/cpu:1"]
    # Each stage's variables live on its device.
    for stage in mode.stages:
        assert stage.variables and all(
            v.value.device.endswith(stage.device[-5:].upper()) for v in stage.variables
        )
    # Against the whole batch: equal up to the order of the gradient sum.
    a, b = weights(tmp_path / "piped"), weights(tmp_path / "whole")
    assert a.keys() == b.keys() and len(a) == 6
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=TOLERANCE, err_msg=name)
    assert piped["eval_loss"] == pytest.approx(whole["eval_loss"], abs=TOLERANCE)
    # Against the same micro-batches on one device: the same sums, bit for bit.
    assert piped["weights_sha256"] == accumulated["weights_sha256"]
    assert piped["eval_loss"] == accumulated["eval_loss"]


def test_gpipe_and_1f1b_give_the_same_weights_and_1f1b_holds_less(tmp_path):
    # Balanced by parameter count: the same cut in both runs (a cut by
    # measured time can differ between runs on a busy machine).
    common = dict(
        strategy="model_parallel", num_microbatches=4, train_steps=20, pipeline_balance="params"
    )
    gpipe, _ = train(config(tmp_path, "gpipe", pipeline_schedule="gpipe", **common))
    ofob, _ = train(config(tmp_path, "1f1b", pipeline_schedule="1f1b", **common))
    assert gpipe["weights_sha256"] == ofob["weights_sha256"]
    held = [s["peak_activation_bytes"] for s in gpipe["pipeline_stages"]]
    held_1f1b = [s["peak_activation_bytes"] for s in ofob["pipeline_stages"]]
    assert held_1f1b[0] == held[0] // 2  # stage 0 of 2: 2 micro-batches of 4
    assert held_1f1b[1] == held[1] // 4  # the last stage: 1 of 4


def test_a_checkpoint_moves_between_model_parallel_and_one_device(tmp_path):
    """Half a run in one mode, the rest in the other, equals the whole run in one."""
    reference, _ = train(config(tmp_path, "reference", num_microbatches=4))
    first = dict(train_steps=30)
    train(config(tmp_path, "mp_then_one", strategy="model_parallel", num_microbatches=4, **first))
    there, _ = train(config(tmp_path, "mp_then_one", num_microbatches=4))
    train(config(tmp_path, "one_then_mp", num_microbatches=4, **first))
    back, _ = train(config(tmp_path, "one_then_mp", strategy="model_parallel", num_microbatches=4))
    assert there["weights_sha256"] == reference["weights_sha256"]
    assert back["weights_sha256"] == reference["weights_sha256"]


def test_the_export_is_one_ordinary_model(tmp_path):
    cfg = config(tmp_path, "export", strategy="model_parallel", train_steps=10, export=True)
    lines = []
    result, mode = train(cfg, log=lines.append)
    assert result["num_microbatches"] == 4 * 2  # the default: 4 per stage
    assert any(line.startswith("Pipeline of 2 stages") for line in lines)
    served = tf.saved_model.load(str(tmp_path / "export" / "export"))
    images = tf.random.uniform([5, 28, 28, 1], 0, 255, seed=1)
    signature = served.signatures["serving_default"]
    logits = next(iter(signature(images=images).values()))
    np.testing.assert_allclose(logits.numpy(), mode.trainer.outputs(images).numpy(), atol=1e-5)
    saved = json.loads((tmp_path / "export" / "metrics.json").read_text())
    assert saved["pipeline_balance"] == "time"
    assert saved["pipeline_bubble_fraction"] == pytest.approx(1 / 9)
    # Each stage's compute per step: in metrics.json and as TensorBoard scalars.
    assert sorted(saved["timings"]) == ["pipeline/stage_0_ms", "pipeline/stage_1_ms"]
    assert all(ms > 0 for ms in saved["timings"].values())
    tags = {
        value.tag
        for path in (tmp_path / "export" / "train").iterdir()
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
    }
    assert {"pipeline/stage_0_ms", "pipeline/stage_1_ms", "loss"} <= tags


def test_balancing_by_parameter_count_is_said(tmp_path):
    cfg = config(
        tmp_path, "params", strategy="model_parallel", pipeline_balance="params", train_steps=5
    )
    result, mode = train(cfg)
    assert result["pipeline_balance"] == "params"
    # hidden_0 (784x64) outweighs everything after it.
    assert mode.stages[0].layer_names[-1] == "hidden_0"
    assert mode.stages[1].layer_names == ["hidden_1", "logits"]


# -- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_stages": 2}, "--num_stages applies to --strategy=model_parallel only"),
        ({"pipeline_schedule": "1f1b"}, "--pipeline_schedule applies to"),
        ({"strategy": "model_parallel", "num_stages": 0}, "--num_stages=0"),
        ({"strategy": "model_parallel", "pipeline_schedule": "zigzag"}, "gpipe, 1f1b"),
        ({"strategy": "model_parallel", "num_microbatches": 5}, "does not split into 5"),
        ({"strategy": "model_parallel", "num_replicas": 2}, "--num_replicas=2 applies to"),
    ],
)
def test_bad_pipeline_settings_are_refused(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        mode_for(config(tmp_path, "bad", **changes))


def test_more_stages_than_devices_is_refused(tmp_path):
    """The test process started TensorFlow with 2 logical CPU devices."""
    cfg = config(tmp_path, "deep", strategy="model_parallel", num_stages=3, num_microbatches=1)
    with pytest.raises(ConfigError, match="--num_stages=3: TensorFlow was already started with 2"):
        train(cfg)


def test_a_cluster_with_fewer_tasks_than_stages_is_refused(tmp_path):
    cluster = parse_tf_config(
        json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker"}})
    )
    cfg = config(tmp_path, "c", strategy="model_parallel", num_stages=2)
    with pytest.raises(ConfigError, match="needs one task per stage.*has 1: expected 2"):
        mode_for(cfg, cluster)


def test_the_cli_refuses_more_stages_than_layers_in_one_line(tmp_path):
    result = run_tftrain(
        "train",
        "--experiment=fashion_mnist_softmax:smoke",
        "--dataset=synthetic",
        "--strategy=model_parallel",
        "--num_stages=5",
        f"--model_dir={tmp_path / 'm'}",
        check=False,
    )
    assert result.returncode == 2
    assert "softmax can be cut into at most 3 piece(s)" in result.stderr
    assert "Traceback" not in result.stderr


# -- stages in two processes ------------------------------------------------------


@pytest.mark.cluster
def test_two_stages_in_two_launched_processes_train_as_the_whole_model(tmp_path):
    flags = [
        "--dataset=synthetic",
        "--model=mlp",
        "--hidden_units=64,32",
        "--optimizer=adam",
        "--learning_rate=0.01",
        "--batch_size=48",
        "--train_steps=60",
        "--steps_per_loop=10",
        "--checkpoint_interval=30",
        "--eval_interval=30",
        "--noexport",
    ]
    launched = tmp_path / "launched"
    result = run_tftrain(
        "launch",
        "--num_workers=2",
        "--",
        *flags,
        "--strategy=model_parallel",
        "--num_microbatches=4",
        f"--model_dir={launched}",
        "--collective_timeout_secs=120",
    )
    assert "stage 1 on /job:worker/replica:0/task:1/device:CPU:0" in result.stdout
    assert "[worker:1] worker:1: the coordinator is done; exiting." in result.stdout
    assert "gRPC servers listen on ports" in result.stdout and "no authentication" in result.stdout
    whole, _ = train(config(tmp_path, "whole"))
    a, b = weights(launched), weights(tmp_path / "whole")
    assert a.keys() == b.keys() and len(a) == 6
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=TOLERANCE, err_msg=name)
    metrics = json.loads((launched / "metrics.json").read_text())
    assert metrics["global_step"] == 60 and metrics["num_workers"] == 2
    assert metrics["eval_loss"] == pytest.approx(whole["eval_loss"], abs=TOLERANCE)


# -- users' models: Sequential, embeddings, residual blocks ---------------------


def _arrays_task(build):
    import tftrain

    rng = np.random.default_rng(3)
    x = rng.normal(size=(384, 8)).astype("float32")
    ids = rng.integers(0, 20, size=(384, 8)).astype("int32")
    y = (x[:, 0] > 0).astype("int32") + (ids[:, 0] % 2)

    class Task(tftrain.Task):
        def build_model(self, config):
            return build()

        def build_inputs(self, config, context, training):
            features = ids if build is _embedding_model else x
            return tftrain.data.from_arrays(
                features, y, config=config, context=context, training=training
            )

        def build_loss(self, config):
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    return Task


def _residual_model():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", name="stem")(inputs)
    for i in range(2):
        y = keras.layers.Dense(16, activation="relu", name=f"block{i}_a")(x)
        y = keras.layers.Dense(16, name=f"block{i}_b")(y)
        x = keras.layers.Add(name=f"block{i}_add")([x, y])
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="residual")


def _embedding_model():
    return keras.Sequential(
        [
            keras.Input((8,), dtype="int32"),
            keras.layers.Embedding(20, 6),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ],
        name="bag",
    )


@pytest.mark.parametrize("build", [_residual_model, _embedding_model])
def test_a_users_residual_or_sequential_embedding_model_is_cut_and_trains_as_one_device(
    tmp_path, build
):
    def cfg(name, **changes):
        return ExperimentConfig(
            task=_arrays_task(build),
            optimizer="adam",
            learning_rate=0.01,
            batch_size=32,
            train_steps=24,
            steps_per_loop=8,
            num_microbatches=4,
            export=False,
            model_dir=str(tmp_path / name),
            **changes,
        ).validate()

    piped, mode = train(
        cfg("piped", strategy="model_parallel", num_stages=2, pipeline_balance="params")
    )
    whole, _ = train(cfg("whole"))
    names = [la.name for stage in mode.stages for la in stage.layers]
    if build is _residual_model:  # blocks stay whole: cut only between them
        assert names == ["stem", "block0_a_to_block0_add", "block1_a_to_block1_add", "head"]
    for stage in mode.stages:
        assert stage.variables and all(
            v.value.device.endswith(stage.device[-5:].upper()) for v in stage.variables
        )
    assert piped["global_step"] == whole["global_step"] == 24
    assert piped["eval_loss"] == pytest.approx(whole["eval_loss"], rel=TOLERANCE)

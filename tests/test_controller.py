import pytest

from tftrain import controller, optimizers
from tftrain.config import ExperimentConfig


def lr_at(optimizer, step):
    optimizer.iterations.assign(step)
    return float(optimizer.learning_rate)


def test_schedule_flags_reach_the_optimizer():
    config = ExperimentConfig(
        optimizer="momentum",
        learning_rate=0.1,
        batch_size=512,
        scale_lr_with_batch=True,
        base_batch_size=256,
        warmup_epochs=1,
        lr_schedule="step",
        lr_decay_epochs=(3,),
        lr_decay_rate=0.1,
        model_dir="/tmp/unused",
    ).validate()
    opt = optimizers.from_config(config, steps_per_epoch=10, total_steps=50)
    assert opt.momentum == 0.9
    peak = 0.1 * 512 / 256  # the linear scaling rule
    assert lr_at(opt, 0) == pytest.approx(peak / 10)  # warm-up over the first epoch
    assert lr_at(opt, 9) == pytest.approx(peak)
    assert lr_at(opt, 29) == pytest.approx(peak)
    assert lr_at(opt, 30) == pytest.approx(peak * 0.1)


def test_constant_rate_needs_no_schedule():
    config = ExperimentConfig(optimizer="sgd", learning_rate=0.3, momentum=0.5, model_dir="/x")
    opt = optimizers.from_config(config.validate(), steps_per_epoch=10, total_steps=10)
    assert lr_at(opt, 7) == pytest.approx(0.3) and opt.momentum == 0.5
    assert not opt.nesterov
    nesterov = config.replace(optimizer="momentum", momentum=None, nesterov=True).validate()
    assert optimizers.from_config(nesterov, steps_per_epoch=10, total_steps=10).nesterov


def train(config, log=lambda line: None):
    """``controller.run`` under the config's own mode; returns the metrics."""
    from tftrain import controller
    from tftrain.distribute.base import mode_for

    mode = mode_for(config)
    mode.setup()
    return controller.run(config, mode, log=log)


def test_rerunning_a_finished_run_leaves_its_metrics_alone(tmp_path):
    import json
    import os

    config = ExperimentConfig(
        dataset="synthetic",
        model="softmax",
        train_steps=20,
        steps_per_loop=10,
        export=False,
        model_dir=str(tmp_path / "run"),
    ).validate()

    first = train(config)
    path = os.path.join(config.model_dir, "metrics.json")
    before = open(path).read()
    lines = []
    again = train(config, lines.append)
    assert again == first and open(path).read() == before
    assert any("already finished at step 20 of 20" in line for line in lines)
    assert not any(line.startswith("Training ") for line in lines)
    # Without its metrics (lost after the last checkpoint), the run is evaluated
    # again; its speed, not measured, is null rather than 0.
    os.remove(path)
    rebuilt = train(config)
    assert rebuilt["eval_loss"] == first["eval_loss"]
    saved = json.load(open(path))
    assert saved["examples_per_second"] is None and saved["training_seconds"] is None


def test_train_scalars_start_at_step_0_and_speed_is_per_interval(tmp_path):
    import os

    import tensorflow as tf

    config = ExperimentConfig(
        dataset="synthetic",
        model="softmax",
        train_steps=40,
        steps_per_loop=10,
        lr_schedule="cosine",
        export=False,
        model_dir=str(tmp_path / "run"),
    ).validate()
    train(config)
    points: dict[str, dict[int, float]] = {}
    folder = os.path.join(config.model_dir, "train")
    for name in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                points.setdefault(value.tag, {})[event.step] = number
    assert points["learning_rate"][0] == pytest.approx(0.001)  # the peak, before any step
    assert sorted(points["learning_rate"]) == [0, 10, 20, 30, 40]
    # The first interval traced the graph: no speed for it.
    assert sorted(points["examples_per_second"]) == [20, 30, 40]
    for step in (20, 30, 40):
        per_step = points["examples_per_second"][step] / points["steps_per_second"][step]
        assert per_step == pytest.approx(config.batch_size)


def test_bfloat16_computes_in_bfloat16_keeps_float32_variables_and_learns(tmp_path):
    import os

    import keras
    import numpy as np
    import tensorflow as tf

    from tftrain import tasks

    def config(precision):
        return ExperimentConfig(
            dataset="fashion_mnist",
            max_train_examples=2000,
            max_eval_examples=1000,
            model="mlp",
            hidden_units=(64,),
            precision=precision,
            learning_rate=0.003,
            train_steps=80,
            steps_per_loop=20,
            model_dir=str(tmp_path / precision),
        ).validate()

    results = {}
    try:
        bf16 = config("bfloat16")
        controller.set_precision("bfloat16")
        model = tasks.from_config(bf16).build_model(bf16)
        hidden = model.get_layer("hidden_0")
        assert hidden.compute_dtype == "bfloat16" and hidden.kernel.dtype == "float32"
        for precision in ("float32", "bfloat16"):
            results[precision] = train(config(precision))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert results["float32"]["eval_accuracy"] > 0.7
    assert abs(results["bfloat16"]["eval_accuracy"] - results["float32"]["eval_accuracy"]) < 0.03
    serve = tf.saved_model.load(os.path.join(bf16.model_dir, "export"))
    (logits,) = serve.signatures["serving_default"](images=tf.zeros([2, 28, 28, 1])).values()
    assert logits.dtype == tf.float32 and np.all(np.isfinite(logits.numpy()))


def test_actions_see_outputs_and_none_is_load_bearing(tmp_path):
    """The controller hands each stretch's and evaluation's outputs to the
    actions it is given; with none of the default ones, the run still
    evaluates, checkpoints and writes the speed and metrics to metrics.json."""
    import json
    import os

    from tftrain import actions
    from tftrain.distribute.base import mode_for

    class Record(actions.Action):
        def __init__(self, interval=None):
            self.interval, self.seen = interval, []

        def __call__(self, output):
            self.seen.append(output)

    config = ExperimentConfig(
        dataset="synthetic",
        model="softmax",
        train_steps=40,
        steps_per_loop=10,
        eval_interval=20,
        checkpoint_interval=20,
        export=False,
        model_dir=str(tmp_path / "run"),
    ).validate()
    every_15, evals = Record(15), Record()
    mode = mode_for(config)
    mode.setup()
    result = controller.run(config, mode, train_actions=[every_15], eval_actions=[evals])
    # Stretches end where the action is due (15, 30) as well as at the loops' ends.
    assert [o.step for o in every_15.seen] == [15, 30, 40]
    assert all(isinstance(o, actions.TrainOutput) for o in every_15.seen)
    assert {"loss", "accuracy"} <= set(every_15.seen[-1].metrics)
    assert every_15.seen[-1].steady_speed and every_15.seen[-1].last
    assert [o.step for o in evals.seen] == [0, 20, 40]
    assert evals.seen[-1].metrics["loss"] == pytest.approx(result["eval_loss"])
    with open(os.path.join(config.model_dir, "metrics.json")) as f:
        written = json.load(f)
    assert written["examples_per_second"] > 0 and written["global_step"] == 40
    assert sorted(os.listdir(os.path.join(config.model_dir, "checkpoints"))) == [
        "checkpoint",
        *sorted(f"ckpt-{s}.{ext}" for s in (20, 40) for ext in ("data-00000-of-00001", "index")),
    ]

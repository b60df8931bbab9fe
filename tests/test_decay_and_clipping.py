"""--weight_decay and --clip_norm: every optimizer against a NumPy reference
(decoupled decay, Loshchilov and Hutter 2019; clipping by the global norm of
the update's gradients), dense and sparse, and under the strategies: the
norm is that of the gradients summed over every replica, not each
replica's own."""

import numpy as np
import pytest
import tensorflow as tf

from tests.test_optimizers import CASES, RULE, NumpyRule, relative_error
from tftrain import controller, optimizers
from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute.base import mode_for

DECAY, CLIP = 0.05, 1.5


def reference_step(rule, weights, grads, decayed, lr):
    """Clip by the global norm, decay the decayed weights, then the rule."""
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    scale = np.float32(CLIP / max(norm, CLIP))
    for w, g, r, d in zip(weights, grads, rule, decayed):
        if d:
            w -= np.float32(lr) * np.float32(DECAY) * w
        r.step(w, g * scale)


@pytest.mark.parametrize("case", CASES)
def test_decay_and_clipping_match_the_numpy_reference(case):
    hp, make, _ = CASES[case]
    rng = np.random.default_rng(3)
    kernel0 = rng.normal(size=(5, 3)).astype(np.float32)
    bias0 = rng.normal(size=(3,)).astype(np.float32)
    import keras

    kernel, bias = keras.Variable(kernel0, name="kernel"), keras.Variable(bias0, name="bias")
    config = make().get_config()
    opt = type(make()).from_config({**config, "weight_decay": DECAY, "global_clipnorm": CLIP})
    left_out = optimizers.exclude_from_decay(opt, [kernel, bias])
    assert left_out == [bias]  # rank 1: left out of the decay
    opt.build([kernel, bias])
    rules = [NumpyRule(RULE[case], **hp), NumpyRule(RULE[case], **hp)]
    ref = [kernel0.copy(), bias0.copy()]
    clipped = 0
    for _ in range(60):
        grads = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
        clipped += np.sqrt(sum(np.sum(g**2) for g in grads)) > CLIP
        opt.apply_gradients(zip(map(tf.constant, grads), [kernel, bias]))
        reference_step(rules, ref, grads, [True, False], hp["learning_rate"])
    assert clipped > 30  # the clip binds on most steps
    assert relative_error(kernel.numpy(), ref[0]) <= 1e-6
    assert relative_error(bias.numpy(), ref[1]) <= 1e-6
    again = type(opt).from_config(opt.get_config())
    assert again.clip_norm == CLIP and again.weight_decay == DECAY


@pytest.mark.parametrize("case", ["sgd", "adagrad"])
def test_a_sparse_gradient_clips_as_its_dense_form(case):
    """Rows that share an index are summed before the norm is taken: a
    sparse update with repeated rows equals the dense reference (for rules
    where rows without gradient do not move)."""
    import keras

    hp, make, _ = CASES[case]
    rng = np.random.default_rng(4)
    table0 = rng.normal(size=(10, 4)).astype(np.float32)
    table = keras.Variable(table0)
    opt = type(make()).from_config({**make().get_config(), "global_clipnorm": CLIP})
    opt.build([table])
    rule, ref = NumpyRule(RULE[case], **hp), table0.copy()
    for _ in range(40):
        indices = rng.integers(0, 10, size=6)  # repeats on most steps
        values = rng.normal(size=(6, 4)).astype(np.float32)
        opt.apply_gradients(
            [(tf.IndexedSlices(tf.constant(values), tf.constant(indices), [10, 4]), table)]
        )
        dense = np.zeros_like(table0)
        np.add.at(dense, indices, values)
        norm = np.sqrt(np.sum(dense.astype(np.float64) ** 2))
        rule.step(ref, dense * np.float32(CLIP / max(norm, CLIP)))
    assert relative_error(table.numpy(), ref) <= 1e-6


def run_config(tmp_path, name, **changes):
    values = dict(
        dataset="synthetic",
        model="mlp",
        hidden_units=(32,),
        optimizer="momentum",
        learning_rate=0.05,
        weight_decay=0.01,
        clip_norm=0.2,
        batch_size=32,
        train_steps=40,
        steps_per_loop=10,
        eval_interval=20,
        checkpoint_interval=20,
        export=False,
        model_dir=str(tmp_path / name),
    )
    values.update(changes)
    return ExperimentConfig(**values).validate()


def train(cfg):
    mode = mode_for(cfg)
    mode.setup()
    return controller.run(cfg, mode, log=lambda line: None)


def test_mirrored_clips_the_sum_of_the_replicas_gradients(tmp_path):
    """Two replicas end as one device does with the clip binding on every
    step; clipping each replica's half by its own norm would not."""
    one = train(run_config(tmp_path, "one"))
    two = train(run_config(tmp_path, "two", strategy="mirrored", num_replicas=2))
    free = train(run_config(tmp_path, "free", clip_norm=None))
    assert one["eval_loss"] != pytest.approx(free["eval_loss"], rel=1e-3)  # it binds
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)


def test_model_parallel_clips_the_gradients_of_every_stage_together(tmp_path):
    """The update's gradients live on two devices; one norm over all of them:
    the pipeline ends as one device with the same micro-batches."""
    piped = train(
        run_config(
            tmp_path,
            "piped",
            strategy="model_parallel",
            num_microbatches=4,
            pipeline_balance="params",
            hidden_units=(32, 16),
        )
    )
    whole = train(run_config(tmp_path, "whole", num_microbatches=4, hidden_units=(32, 16)))
    assert piped["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)


def test_a_run_with_decay_and_clipping_resumes_exactly(tmp_path):
    straight = train(run_config(tmp_path, "straight", optimizer="adam", learning_rate=0.01))
    train(run_config(tmp_path, "split", optimizer="adam", learning_rate=0.01, train_steps=20))
    resumed = train(run_config(tmp_path, "split", optimizer="adam", learning_rate=0.01))
    assert resumed["weights_sha256"] == straight["weights_sha256"]


@pytest.mark.parametrize(
    "changes, said",
    [
        ({"weight_decay": -0.1}, "--weight_decay=-0.1"),
        ({"clip_norm": 0.0}, "--clip_norm=0.0"),
        ({"weight_decay_exclude": ("emb(",)}, "not a regular expression"),
    ],
)
def test_bad_decay_or_clip_settings_are_refused(changes, said):
    with pytest.raises(ConfigError, match=said.replace("(", r"\(")):
        ExperimentConfig(model_dir="/x", **changes).validate()


@pytest.mark.cluster
@pytest.mark.slow
def test_launched_clusters_clip_and_decay_as_one_device(tmp_path):
    """One worker and one ps: each update is that worker's gradients, clipped
    by their own norm and decayed on the ps, as one device would."""
    import json

    from tests.conftest import run_tftrain

    flags = [
        "--dataset=synthetic",
        "--model=mlp",
        "--hidden_units=32",
        "--optimizer=momentum",
        "--learning_rate=0.05",
        "--weight_decay=0.01",
        "--clip_norm=0.2",
        "--batch_size=32",
        "--train_steps=40",
        "--steps_per_loop=10",
        "--export=false",
    ]
    ps_dir, one_dir, two_dir = (str(tmp_path / n) for n in ("ps", "one", "two"))
    run_tftrain(
        "launch",
        "--num_workers=1",
        "--num_ps=1",
        "--",
        *flags,
        "--strategy=parameter_server",
        f"--model_dir={ps_dir}",
    )
    run_tftrain("train", *flags, f"--model_dir={one_dir}")
    # And two workers summing over tftrain's TCP ring clip the sum, as one device.
    run_tftrain(
        "launch",
        "--num_workers=2",
        "--",
        *flags,
        "--strategy=multi_worker_mirrored",
        f"--model_dir={two_dir}",
    )
    ps, one, two = (json.load(open(f"{d}/metrics.json")) for d in (ps_dir, one_dir, two_dir))
    assert ps["global_step"] == 40 and two["num_workers"] == 2
    assert ps["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)


def test_attention_biases_of_rank_two_are_left_out_of_the_decay():
    import keras

    attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
    x = np.zeros((1, 3, 8), np.float32)
    attention(x, x)
    opt = optimizers.get("adam", weight_decay=0.1)
    left_out = {v.path for v in optimizers.exclude_from_decay(opt, attention.trainable_variables)}
    assert "attention/query/bias" in left_out  # shape (2, 4)
    assert not any(path.endswith("kernel") for path in left_out)

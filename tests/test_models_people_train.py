"""The ResNet and the Vision Transformer of ``experiments/`` (smoke-sized)
under every mode: BatchNorm's statistics synchronized or not, the pipeline
of stages on residual and attention blocks, parameter servers, launched
workers."""

import json
import os
import re

import pytest

import tftrain
from tests.conftest import run_tftrain

pytestmark = pytest.mark.usefixtures("fashion_mnist_dir")

# The smoke variants' accuracy after their 64 steps on one device is about
# 0.57 (ResNet-8) and 0.56 (ViT); chance is 0.10.
SMOKE_BAR = {"fashion_mnist_resnet": 0.35, "fashion_mnist_vit": 0.25}


def train(tmp_path, name, experiment="fashion_mnist_resnet", **changes):
    changes.setdefault("export", False)
    return tftrain.train(f"{experiment}:smoke", model_dir=str(tmp_path / name), **changes)


def metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def launch(tmp_path, name, experiment, *flags, workers=2, ps=0):
    model_dir = str(tmp_path / name)
    result = run_tftrain(
        "launch",
        f"--num_workers={workers}",
        *([f"--num_ps={ps}"] if ps else []),
        "--",
        f"--experiment={experiment}:smoke",
        f"--model_dir={model_dir}",
        "--export=false",
        *flags,
    )
    return metrics(model_dir), result.stdout


@pytest.mark.long  # test_user_experiments.py: sync BatchNorm over two replicas, smaller
def test_resnet_mirrored_normalizes_as_one_device_only_with_sync_batchnorm(tmp_path):
    """In float64, so that what is compared is the arithmetic and not float32
    round-off, which BatchNorm's cancellations and SGD at 0.1 amplify to
    about 1e-2 over these 64 steps (BUILD_NOTES.md). Each example's
    augmentation is drawn from its own seed, so the two replicas' halves are
    one device's batch; BatchNorm then decides."""
    one = train(tmp_path, "one", precision="float64")
    mirrored = dict(strategy="mirrored", num_replicas=2, precision="float64")
    synced = train(tmp_path, "synced", sync_batchnorm=True, **mirrored)
    own = train(tmp_path, "own", **mirrored)
    assert one["global_step"] == 64 and one["eval_accuracy"] >= SMOKE_BAR["fashion_mnist_resnet"]
    assert synced["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)
    assert own["eval_loss"] != pytest.approx(one["eval_loss"], rel=1e-3)


def test_resnet_in_two_stages_is_one_device_with_its_micro_batches(tmp_path):
    """BatchNorm's statistics are each micro-batch's and its moving averages
    move once per micro-batch, in order, on the stage that holds them: as one
    device with --num_microbatches=4 does. In float64, as above: in float32
    the two ended 2.7e-3 apart on one CI run and within 1e-4 on others, as
    round-off in another order of the same sums was amplified or not."""
    same = dict(num_microbatches=4, precision="float64")
    piped = train(tmp_path, "piped", strategy="model_parallel", **same)
    whole = train(tmp_path, "whole", **same)
    assert len(piped["pipeline_stages"]) == 2
    assert piped["eval_accuracy"] >= SMOKE_BAR["fashion_mnist_resnet"]
    assert piped["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-6)


def test_vit_in_two_stages_is_one_device_with_its_micro_batches(tmp_path):
    piped = train(
        tmp_path, "piped", "fashion_mnist_vit", strategy="model_parallel", num_microbatches=4
    )
    whole = train(tmp_path, "whole", "fashion_mnist_vit", num_microbatches=4)
    assert piped["global_step"] == 64 and len(piped["pipeline_stages"]) == 2
    assert piped["eval_accuracy"] >= SMOKE_BAR["fashion_mnist_vit"]
    assert piped["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.long  # test_user_experiments.py: launched workers' synced BatchNorm, smaller
def test_launched_resnet_workers_with_sync_batchnorm_end_as_one_device(tmp_path):
    one = train(tmp_path, "one", precision="float64")
    two, out = launch(
        tmp_path,
        "two",
        "fashion_mnist_resnet",
        "--strategy=multi_worker_mirrored",
        "--sync_batchnorm",
        "--precision=float64",
    )
    assert two["num_workers"] == 2
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)
    assert len(set(re.findall(r"Final weights sha256 (\w+)", out))) == 1


@pytest.mark.slow
@pytest.mark.cluster
def test_launched_vit_stages_end_as_one_device_with_its_micro_batches(tmp_path):
    whole = train(tmp_path, "whole", "fashion_mnist_vit", num_microbatches=4)
    piped, _ = launch(
        tmp_path,
        "piped",
        "fashion_mnist_vit",
        "--strategy=model_parallel",
        "--num_microbatches=4",
    )
    assert [s["device"].split("/")[1] for s in piped["pipeline_stages"]] == [
        "job:worker",
        "job:worker",
    ]
    assert piped["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.long  # a parameter server and BatchNorm: the one-worker test, by default
@pytest.mark.parametrize("experiment", ["fashion_mnist_resnet", "fashion_mnist_vit"])
def test_parameter_servers_train_both_models_to_their_smoke_bar(tmp_path, experiment):
    got, _ = launch(tmp_path, "ps", experiment, "--strategy=parameter_server", ps=1)
    assert got["global_step"] == 64 and got["num_ps"] == 1
    assert got["eval_accuracy"] >= SMOKE_BAR[experiment]


def test_an_augmented_batchnorm_run_resumes_exactly(tmp_path):
    """The augmentation's draws and BatchNorm's moving averages both come
    back: stopped at step 32 and resumed, the run ends as an uninterrupted one."""
    constant = dict(lr_schedule="constant", warmup_epochs=0.0, checkpoint_interval=16)
    straight = train(tmp_path, "straight", **constant)
    train(tmp_path, "split", train_steps=32, **constant)
    resumed = train(tmp_path, "split", **constant)
    assert resumed["weights_sha256"] == straight["weights_sha256"]


@pytest.mark.slow
@pytest.mark.cluster
def test_one_parameter_server_worker_keeps_batchnorm_as_one_device(tmp_path):
    """With one worker no two steps overlap: the moving averages on the ps
    follow every batch, as on one device."""
    one = train(tmp_path, "one")
    got, _ = launch(
        tmp_path, "ps", "fashion_mnist_resnet", "--strategy=parameter_server", workers=1, ps=1
    )
    assert got["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)


def test_a_replica_left_without_evaluation_examples_is_skipped(tmp_path):
    """500 test examples in global batches of 1,000: the one batch goes to the
    first replica, the second has none (a convolution fails on an empty batch)."""
    got = tftrain.train(
        "fashion_mnist_cnn:smoke",
        model_dir=str(tmp_path / "run"),
        strategy="mirrored",
        num_replicas=2,
        eval_batch_size=1000,
        export=False,
    )
    assert got["eval_examples"] == 500 and got["eval_accuracy"] > 0.2


def vit_module():
    import sys

    from tftrain import registry

    return sys.modules[registry.get("fashion_mnist_vit").task.__module__]


def test_shifted_patches_hold_each_patch_and_its_four_diagonal_neighbours():
    """Token (r, c) holds, pixel by pixel and channel by channel, the patch
    at (r, c) of the image and of its four copies moved by half a patch
    diagonally, with 0 where a copy reaches past the edge."""
    import numpy as np

    image = np.random.default_rng(0).integers(1, 256, (1, 28, 28, 1)).astype(np.uint8)
    tokens = np.asarray(vit_module().ShiftedPatches(4)(image))
    assert tokens.shape == (1, 49, 4 * 4 * 5) and tokens.dtype == np.uint8
    shifts = [(0, 0), (-2, -2), (-2, 2), (2, -2), (2, 2)]
    for r, c in [(0, 0), (0, 6), (3, 4), (6, 6)]:
        token = tokens[0, 7 * r + c].reshape(4, 4, 5)
        for a in range(4):
            for b in range(4):
                for k, (dy, dx) in enumerate(shifts):
                    y, x = 4 * r + a + dy, 4 * c + b + dx
                    want = image[0, y, x, 0] if 0 <= y < 28 and 0 <= x < 28 else 0
                    assert token[a, b, k] == want, (r, c, a, b, k)


def test_smoothed_crossentropy_is_the_numpy_reference():
    import numpy as np

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    loss = vit_module().SmoothedSparseCrossentropy(10, 0.1, reduction="none")(labels, logits)
    targets = np.full((6, 10), 0.1 / 10)
    targets[np.arange(6), labels] += 0.9
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(np.asarray(loss), -(targets * log_softmax).sum(axis=1), rtol=1e-5)


def test_the_vit_options_layer_and_loss_come_back_from_their_configs():
    import keras

    vit = vit_module()
    layer = vit.ShiftedPatches(7, name="cut")
    again = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(again) is vit.ShiftedPatches and again.patch == 7 and again.name == "cut"
    loss = vit.SmoothedSparseCrossentropy(10, 0.2)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert (again.num_classes, again.smoothing, again.from_logits) == (10, 0.2, True)
    # tftrain checks labels and logits against it as against Keras's own.
    from tftrain import tasks

    assert tasks._loss_kind(loss) == "sparse" and tasks.from_logits(loss) is True


@pytest.mark.parametrize("value", ["1", "-0.1"])
def test_a_label_smoothing_outside_zero_to_one_is_one_line(tmp_path, value):
    result = run_tftrain(
        "train",
        "--experiment=fashion_mnist_vit:smoke",
        f"--label_smoothing={value}",
        f"--model_dir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tftrain: error: --label_smoothing={float(value)}: from 0 up to, not including, 1."
    ]
    assert not (tmp_path / "run").exists()

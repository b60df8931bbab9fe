"""A user's own experiment (tests/data/user_exp.py, copied to a folder outside
the repository): their models, custom layers, losses, metrics and files,
under every mode, from the command line and from Python."""

import glob
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT, run_tftrain, start_tftrain
from tftrain import tasks

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """The experiment file, in a folder of its own with its data beside it."""
    folder = tmp_path_factory.mktemp("user_project")
    assert not str(folder).startswith(ROOT)
    path = str(folder / "user_exp.py")
    shutil.copy(os.path.join(HERE, "data", "user_exp.py"), path)
    code = f"import sys; sys.path.insert(0, {str(folder)!r}); import user_exp; "
    code += f"user_exp.write_data({str(folder / 'data')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    return path


def metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def train(exp, variant, model_dir, *flags, check=True):
    spec = exp + (f":{variant}" if variant else "")
    return run_tftrain(
        "train", f"--experiment={spec}", f"--model_dir={model_dir}", *flags, check=check
    )


def scalar_tags(folder):
    tags = set()
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_a_user_experiment_from_a_file_trains_with_its_options_recorded(exp, tmp_path):
    model_dir = str(tmp_path / "run")
    result = train(exp, None, model_dir, "--batchnorm=true", "--train_steps=16")
    got = metrics(model_dir)
    assert got["global_step"] == 16 and got["model"] == "residual_convnet"
    assert 0 <= got["eval_accuracy"] <= 1 and "eval_loss" in got
    assert "Training residual_convnet" in result.stdout
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    assert config["experiment_source"] == exp
    # The name Python would import it by: tftrain.train of the imported task
    # records the same.
    assert config["task"] == "user_exp:ConvTask"
    sys.path.insert(0, os.path.dirname(exp))
    try:
        imported = importlib.import_module("user_exp")
    finally:
        sys.path.pop(0)
    assert tasks.task_name(imported.ConvTask) == config["task"]
    assert config["options"]["batchnorm"] is True  # set on the command line
    assert "model" not in config and "dataset" not in config  # the built-in task's, not this
    # Two batch norms' moving means and variances: the option reached build_model.
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    state = [n for n in reader.get_variable_to_shape_map() if n.startswith("model_state/")]
    assert len(state) == 4
    assert os.path.exists(os.path.join(model_dir, "model.keras"))


def test_an_option_of_the_wrong_type_is_one_line(exp, tmp_path):
    result = train(exp, None, str(tmp_path / "run"), "--width=wide", check=False)
    assert result.returncode != 0
    assert "width" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_mirrored_two_replicas_end_as_one_device_on_a_transformer(exp, tmp_path):
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    train(exp, "text", one)
    train(exp, "text", two, "--strategy=mirrored", "--num_replicas=2")
    a, b = metrics(one), metrics(two)
    assert b["num_replicas"] == 2
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=1e-6)


def test_sync_batchnorm_makes_two_replicas_normalize_as_one_device(exp, tmp_path):
    """BatchNorm inside a custom residual block: with --sync_batchnorm two
    mirrored replicas (each half of the same global batch) end as one device;
    without it each replica normalizes with its own half's statistics. In
    float64: float32 round-off in another order of the same sums, amplified
    by BatchNorm, put the synced run 1.5e-4 from one device on an AVX2 CPU
    (within 1e-4 on an AVX-512 one); in float64 it is 1e-7."""
    flags = ["--batchnorm=true", "--train_steps=48", "--epochs=1", "--precision=float64"]
    mirrored = ["--strategy=mirrored", "--num_replicas=2"]
    runs = {
        "one": [],
        "synced": [*mirrored, "--sync_batchnorm"],
        "own": mirrored,
    }
    for name, extra in runs.items():
        train(exp, None, str(tmp_path / name), *flags, *extra)
    one, synced, own = (metrics(str(tmp_path / n))["eval_loss"] for n in runs)
    assert synced == pytest.approx(one, rel=1e-6)
    assert own != pytest.approx(one, rel=3e-4)  # (about 1e-3 apart here)


@pytest.mark.slow
@pytest.mark.cluster
def test_launched_workers_keep_the_same_batchnorm_averages_only_when_synced(exp, tmp_path):
    hashes = {}
    for flag in ("--sync_batchnorm", "--nosync_batchnorm"):
        result = run_tftrain(
            "launch",
            "--num_workers=2",
            "--",
            f"--experiment={exp}",
            "--batchnorm=true",
            "--train_steps=24",
            "--strategy=multi_worker_mirrored",
            "--export=false",
            flag,
            f"--model_dir={tmp_path / flag}",
        )
        hashes[flag] = set(re.findall(r"Final weights sha256 (\w+)", result.stdout))
    assert len(hashes["--sync_batchnorm"]) == 1  # both workers: the same weights
    assert len(hashes["--nosync_batchnorm"]) == 2  # each its own moving averages


@pytest.mark.slow
@pytest.mark.cluster
def test_two_launched_workers_end_as_one_device_with_example_shards(exp, tmp_path):
    one = str(tmp_path / "one")
    both = str(tmp_path / "both")
    train(exp, None, one, "--shard=example")
    result = run_tftrain(
        "launch",
        "--num_workers=2",
        "--",
        f"--experiment={exp}",
        "--strategy=multi_worker_mirrored",
        "--shard=example",
        f"--model_dir={both}",
        timeout=600,
    )
    assert result.stdout.count("Final weights sha256") == 2
    a, b = metrics(one), metrics(both)
    assert b["num_workers"] == 2
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.cluster
def test_parameter_servers_train_a_user_experiment(exp, tmp_path):
    model_dir = str(tmp_path / "ps")
    run_tftrain(
        "launch",
        "--num_workers=2",
        "--num_ps=1",
        "--",
        f"--experiment={exp}:text",
        "--strategy=parameter_server",
        f"--model_dir={model_dir}",
        timeout=600,
    )
    got = metrics(model_dir)
    assert got["num_ps"] == 1 and got["global_step"] == 48
    assert got["staleness"]["updates"] == 48


@pytest.mark.slow
def test_model_parallel_cuts_a_transformer_with_an_embedding(exp, tmp_path):
    model_dir = str(tmp_path / "mp")
    result = train(exp, "text", model_dir, "--strategy=model_parallel", "--num_stages=2")
    got = metrics(model_dir)
    assert got["num_stages"] == 2 and got["global_step"] == 48
    assert "stage 1" in result.stdout


def test_tftrain_train_from_python_returns_the_metrics(exp, tmp_path):
    import tftrain

    model_dir = str(tmp_path / "py")
    got = tftrain.train(f"{exp}:regression", model_dir=model_dir, train_steps=8, width=8)
    assert got == metrics(model_dir)
    assert got["global_step"] == 8 and "eval_mae" in got and "eval_accuracy" not in got
    with pytest.raises(tftrain.ConfigError, match="neither a field"):
        tftrain.train(f"{exp}:regression", model_dir=model_dir, no_such_option=1)


@pytest.mark.parametrize(
    "variant,names",
    [("regression", ["mae"]), ("multilabel", ["hamming", "auc"])],
)
def test_metrics_keep_their_own_names_everywhere(exp, tmp_path, variant, names):
    model_dir = str(tmp_path / variant)
    result = train(exp, variant, model_dir, "--train_steps=16")
    got = metrics(model_dir)
    for name in names:
        assert f"eval_{name}" in got and f"eval {name}" in result.stdout
    assert not any("accuracy" in k for k in got)
    assert "accuracy" not in result.stdout
    train_tags = scalar_tags(os.path.join(model_dir, "train"))
    eval_tags = scalar_tags(os.path.join(model_dir, "eval"))
    assert {"loss", *names} <= train_tags and {"loss", *names} <= eval_tags
    assert "accuracy" not in train_tags | eval_tags


def test_the_export_of_a_two_input_model_serves_its_own_inputs(exp, tmp_path):
    import keras

    model_dir = str(tmp_path / "two")
    train(exp, "two_inputs", model_dir, "--train_steps=16")
    served = tf.saved_model.load(os.path.join(model_dir, "export"))
    signature = served.signatures["serving_default"]
    inputs = signature.structured_input_signature[1]
    assert {k: v.dtype for k, v in inputs.items()} == {
        "measurements": tf.float32,
        "category": tf.int32,
    }
    rng = np.random.default_rng(0)
    batch = {
        "measurements": rng.normal(size=(5, 6)).astype(np.float32),
        "category": rng.integers(0, 10, (5, 2)).astype(np.int32),
    }
    (out,) = signature(**{k: tf.constant(v) for k, v in batch.items()}).values()
    model = keras.models.load_model(os.path.join(model_dir, "model.keras"))
    np.testing.assert_allclose(out.numpy(), model.predict(batch, verbose=0), rtol=1e-5)


@pytest.mark.parametrize(
    "variant,said",
    [
        ("broken_softmax", "ends in a softmax but the loss"),
        ("broken_model", "returned str: expected a keras.Model"),
        ("broken_elements", "expected (features, labels)"),
        ("broken_labels", "a label is 1"),
        ("broken_strings", "the labels are strings"),
        ("broken_raises", "RaisesInBuild.build_model raised AttributeError"),
    ],
)
def test_a_users_mistake_is_one_line_and_exit_2_before_anything_is_written(
    exp, tmp_path, variant, said
):
    model_dir = tmp_path / variant
    result = train(exp, variant, str(model_dir), check=False)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tftrain: error:") and said in last
    if variant == "broken_raises":  # their own bug: their traceback, from their file
        assert "Traceback" in result.stderr and "user_exp.py" in result.stderr
        assert "tftrain/controller.py" not in result.stderr
    else:
        assert "Traceback" not in result.stderr
    assert not model_dir.exists()


def test_a_label_out_of_range_met_mid_run_is_one_line(exp, tmp_path):
    result = train(exp, "broken_late_label", str(tmp_path / "late"), check=False)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tftrain: error: a label in the data is 1")
    assert "outputs 4 classes" in last and "Traceback" not in result.stderr


def test_histograms_do_not_change_the_run(exp, tmp_path):
    """The histograms' gradient probe runs the model in training mode; the
    BatchNorm moving averages it moves are put back."""
    flags = ["--batchnorm=true", "--train_steps=24", "--export=false"]
    train(exp, None, str(tmp_path / "plain"), *flags)
    train(exp, None, str(tmp_path / "looked"), *flags, "--histogram_every=8")
    looked = metrics(str(tmp_path / "looked"))
    assert looked["weights_sha256"] == metrics(str(tmp_path / "plain"))["weights_sha256"]
    assert any(t.startswith("weights/") for t in summary_tags(tmp_path / "looked"))


def summary_tags(model_dir):
    return scalar_tags(os.path.join(model_dir, "train"))


def test_a_missing_experiment_file_or_one_without_get_config_is_one_line(tmp_path):
    missing = run_tftrain(
        "train", f"--experiment={tmp_path}/nope.py", f"--model_dir={tmp_path}/r", check=False
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    result = run_tftrain("train", f"--experiment={empty}", f"--model_dir={tmp_path}/r", check=False)
    assert result.returncode == 2 and "has no get_config" in result.stderr
    module = run_tftrain(
        "train", "--experiment=no_such_package.exp", f"--model_dir={tmp_path}/r", check=False
    )
    assert module.returncode == 2 and "importable module" in module.stderr
    assert "Traceback" not in missing.stderr + result.stderr + module.stderr


@pytest.mark.slow
@pytest.mark.long  # the plain tf.data stream's resume test covers the saved iterator
def test_a_resume_over_tfrecords_sees_the_batches_an_uninterrupted_run_would(exp, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    flags = ["--checkpoint_interval=10", "--steps_per_loop=5"]
    train(exp, "text", straight, "--train_steps=40", *flags)
    train(exp, "text", resumed, "--train_steps=30", *flags)  # stops mid-epoch 2
    result = train(exp, "text", resumed, "--train_steps=40", *flags)
    assert "Resumed from" in result.stdout and "ckpt-30" in result.stdout
    assert metrics(resumed)["weights_sha256"] == metrics(straight)["weights_sha256"]


@pytest.mark.slow
@pytest.mark.long  # test_cli.py: a killed run resumes to the uninterrupted weights
def test_sigkill_mid_run_then_the_same_command_ends_as_an_uninterrupted_run(exp, tmp_path):
    flags = ["--train_steps=600", "--checkpoint_interval=50", "--steps_per_loop=10"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    train(exp, "text", straight, *flags)
    process = start_tftrain(
        "train",
        f"--experiment={exp}:text",
        f"--model_dir={killed}",
        *flags,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(f"{killed}/checkpoints/ckpt-100.index"):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not os.path.exists(os.path.join(killed, "metrics.json")), "killed too late"
    train(exp, "text", killed, *flags)
    assert metrics(killed)["weights_sha256"] == metrics(straight)["weights_sha256"]


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.long  # tests/test_bucket.py: a killed worker of two, then the weights
def test_a_killed_worker_of_two_then_the_same_launch_ends_as_an_uninterrupted_one(exp, tmp_path):
    flags = [
        f"--experiment={exp}:text",
        "--strategy=multi_worker_mirrored",
        "--train_steps=400",
        "--checkpoint_interval=40",
        "--steps_per_loop=10",
    ]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_tftrain("launch", "--num_workers=2", "--", *flags, f"--model_dir={straight}")
    proc = start_tftrain(
        "launch",
        "--num_workers=2",
        "--",
        *flags,
        f"--model_dir={killed}",
        stderr=subprocess.STDOUT,
    )
    deadline, pid = time.time() + 180, None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "started worker:1 (pid" in line:
            pid = int(line.split("(pid ")[1].split(")")[0])
        if pid and glob.glob(f"{killed}/checkpoints/ckpt-120.index"):
            break
    assert pid, "the launcher never started worker:1"
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(killed, "metrics.json")), "killed too late"
    result = run_tftrain("launch", "--num_workers=2", "--", *flags, f"--model_dir={killed}")
    assert "Resumed from" in result.stdout
    assert metrics(killed)["weights_sha256"] == metrics(straight)["weights_sha256"]


@pytest.mark.slow
@pytest.mark.cluster
def test_each_worker_resumes_its_own_tf_data_pipeline_where_it_was(exp, tmp_path):
    """Two launched workers, each with its own shard and shuffle buffer of a
    plain tf.data pipeline: a run stopped at step 20 and resumed to 30 ends
    with the weights of one that ran 30 steps straight (each worker restores
    its own iterator's state, not the chief's)."""
    flags = [
        f"--experiment={exp}:plain",
        "--strategy=multi_worker_mirrored",
        "--steps_per_loop=5",
        "--checkpoint_interval=10",
        "--learning_rate=0.01",
        "--export=false",
    ]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_tftrain(
        "launch", "--num_workers=2", "--", *flags, "--train_steps=30", f"--model_dir={straight}"
    )
    run_tftrain(
        "launch", "--num_workers=2", "--", *flags, "--train_steps=20", f"--model_dir={split}"
    )
    assert sorted(os.listdir(os.path.join(split, "checkpoints", "input"))) == [
        "worker-0",
        "worker-1",
    ]
    result = run_tftrain(
        "launch", "--num_workers=2", "--", *flags, "--train_steps=30", f"--model_dir={split}"
    )
    assert "Resumed from" in result.stdout
    assert metrics(split)["weights_sha256"] == metrics(straight)["weights_sha256"]


def test_a_plain_tf_data_stream_resumes_from_the_iterator_saved_in_the_checkpoint(tmp_path):
    import keras

    import tftrain

    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 4)).astype("float32")
    y = (x.sum(1) > 0).astype("int32")

    class Plain(tftrain.Task):  # its own tf.data pipeline: no tftrain.data helper
        def build_model(self, config):
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            return model

        def build_inputs(self, config, context, training):
            ds = tf.data.Dataset.from_tensor_slices((x, y))
            return ds.batch(context.get_per_replica_batch_size(config.batch_size), True)

    config = tftrain.ExperimentConfig(task=Plain, batch_size=32, steps_per_loop=3, export=False)
    straight = tftrain.train(config, model_dir=str(tmp_path / "a"), train_steps=15)
    tftrain.train(config, model_dir=str(tmp_path / "b"), train_steps=9)  # 6 batches an epoch
    reader = tf.train.load_checkpoint(str(tmp_path / "b" / "checkpoints"))
    assert any(n.startswith("input/") for n in reader.get_variable_to_shape_map())
    resumed = tftrain.train(config, model_dir=str(tmp_path / "b"), train_steps=15)
    assert resumed["weights_sha256"] == straight["weights_sha256"]


def test_the_tfds_helper_streams_a_dataset_prepared_in_a_local_folder(tmp_path):
    import tensorflow_datasets as tfds

    from tftrain import inputs
    from tftrain.config import ExperimentConfig
    from tftrain.errors import DataError

    class TinyShapes(tfds.core.GeneratorBasedBuilder):  # TFDS's own builder, no download
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(8, 8, 1)),
                        "label": tfds.features.ClassLabel(num_classes=2),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 96), "test": self._generate_examples(1, 40)}

        def _generate_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                label = int(rng.integers(0, 2))
                image = np.full((8, 8, 1), 200 * label, np.uint8)
                yield i, {"image": image, "label": label}

    data_dir = str(tmp_path / "tfds")
    config = ExperimentConfig(batch_size=16, seed=3, data_dir=data_dir, model_dir="unused")
    with pytest.raises(DataError, match="not prepared"):
        tftrain_tfds(config, inputs.input_context(), True)
    TinyShapes(data_dir=data_dir).download_and_prepare()
    stream = tftrain_tfds(config, inputs.input_context(), True)
    assert stream.tftrain_steps_per_epoch == 6  # 96 examples in batches of 16
    batches = [b for _, b in zip(range(12), stream)]
    assert all(x.shape == (16, 8, 8, 1) and x.dtype == tf.uint8 for x, _ in batches)
    first, second = (
        np.sort(np.concatenate([y for _, y in batches[e * 6 : e * 6 + 6]])) for e in (0, 1)
    )
    np.testing.assert_array_equal(first, second)  # each epoch: every example once
    halves = [tftrain_tfds(config, inputs.input_context(2, i, 2), True) for i in (0, 1)]
    assert [next(iter(h))[0].shape[0] for h in halves] == [8, 8]  # per replica


def tftrain_tfds(config, context, training):
    import tftrain

    return tftrain.data.tfds(
        "tiny_shapes", "train", config=config, context=context, training=training, shard="example"
    )

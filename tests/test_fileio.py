"""The run's folder on TensorFlow's filesystems: ``tftrain.fileio`` on a
local disk and on ``ram://`` (TensorFlow's in-process filesystem, standing
in for a bucket here; tests/test_bucket.py runs against a real object-store
server), and whole runs whose ``--model_dir`` is a URL."""

import json
import os
import uuid

import pytest
import tensorflow as tf

import tftrain
from tests.conftest import run_tftrain
from tftrain import fileio
from tftrain.config import ConfigError


@pytest.fixture(params=["local", "ram"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"ram://{uuid.uuid4().hex}/run"


def test_the_files_of_a_run_on_either_filesystem(folder):
    fileio.makedirs(fileio.join(folder, "checkpoints", "a"))
    assert fileio.isdir(folder) and not fileio.exists(fileio.join(folder, "metrics.json"))
    path = fileio.join(folder, "metrics.json")
    fileio.write_text_atomically(path, '{"a": 1}\n')
    fileio.write_text_atomically(path, '{"a": 2}\n')
    assert json.loads(fileio.read_text(path)) == {"a": 2}
    assert sorted(fileio.listdir(folder)) == ["checkpoints", "metrics.json"]  # no .tmp left
    assert fileio.mtime(path) > 0 or folder.startswith("ram://")  # ram:// keeps no times
    for name in ("ckpt-1.index", "ckpt-1.data-00000-of-00001", "ckpt-2.index"):
        fileio.write_text_atomically(fileio.join(folder, "checkpoints", name), name)
    found = fileio.glob(fileio.join(folder, "checkpoints"), "ckpt-1.*")
    assert sorted(os.path.basename(p) for p in found) == [
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
    ]
    # A folder moves whole, files and subfolders; the source is gone.
    fileio.write_text_atomically(fileio.join(folder, "checkpoints", "a", "deep"), "x")
    fileio.move(fileio.join(folder, "checkpoints"), fileio.join(folder, "previous"))
    assert not fileio.exists(fileio.join(folder, "checkpoints", "ckpt-2.index"))
    assert fileio.read_text(fileio.join(folder, "previous", "a", "deep")) == "x"
    assert fileio.read_text(fileio.join(folder, "previous", "ckpt-2.index")) == "ckpt-2.index"
    # A file replaces another; a folder replaces another.
    fileio.replace(fileio.join(folder, "previous", "ckpt-2.index"), path)
    assert fileio.read_text(path) == "ckpt-2.index"
    fileio.makedirs(fileio.join(folder, "export"))
    fileio.write_text_atomically(fileio.join(folder, "export", "old"), "old")
    fileio.replace(fileio.join(folder, "previous"), fileio.join(folder, "export"))
    assert not fileio.exists(fileio.join(folder, "export", "old"))
    assert fileio.read_text(fileio.join(folder, "export", "a", "deep")) == "x"
    fileio.rmtree(fileio.join(folder, "export"))
    fileio.rmtree(fileio.join(folder, "export"))  # gone already: no error
    assert sorted(fileio.listdir(folder)) == ["metrics.json"]
    with pytest.raises(OSError):
        fileio.read_text(fileio.join(folder, "nothing.json"))


def test_schemes_tensorflow_lacks_and_folders_a_cluster_cannot_share():
    fileio.check_scheme("gs://bucket/run")  # built in: no I/O to know it
    fileio.check_scheme("/local/run")
    with pytest.raises(ConfigError, match=r"no filesystem for s3:// here; tensorflow-io's"):
        fileio.check_scheme("s3://bucket/run")
    with pytest.raises(ConfigError, match=r"--data_dir=zz://x: .* no installed package"):
        fileio.check_scheme("zz://x", "--data_dir")
    fileio.check_shared("gs://bucket/run")
    with pytest.raises(ConfigError, match="ram:// lives in one process"):
        fileio.check_shared("ram://bucket/run")


def test_a_url_the_machine_cannot_open_is_one_line_and_nothing_is_written(tmp_path):
    result = run_tftrain(
        "train",
        "--experiment=fashion_mnist_mlp:smoke",
        "--model_dir=s3://bucket/run",
        check=False,
        cwd=str(tmp_path),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tftrain: error: --model_dir=s3://bucket/run: TensorFlow")
    assert os.listdir(tmp_path) == []  # no folder named after the URL


def _weights_after(model_dir, steps):
    # A constant rate: a run stopped early is the start of a longer one.
    return tftrain.train(
        "fashion_mnist_mlp:smoke",
        model_dir=model_dir,
        train_steps=steps,
        steps_per_loop=20,
        lr_schedule="constant",
    )["weights_sha256"]


def test_a_run_on_a_url_keeps_everything_there_and_resumes_past_a_damaged_checkpoint(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a folder named after the URL would appear here
    url = f"ram://{uuid.uuid4().hex}/run"
    _weights_after(url, 60)
    assert os.listdir(tmp_path) == []
    names = {
        os.path.relpath(os.path.join(root, f), url)
        for root, _, files in tf.io.gfile.walk(url)
        for f in files
    }
    assert {
        "config.json",
        "metrics.json",
        "model.keras",
        "export/saved_model.pb",
        "checkpoints/checkpoint",
        "checkpoints/ckpt-60.index",
    } <= names
    assert any(n.startswith("train/events.out.tfevents") for n in names)
    # Served from the bucket: the export predicts.
    served = tf.saved_model.load(fileio.join(url, "export"))
    out = served.signatures["serving_default"](tf.zeros([2, 28, 28, 1]))
    assert next(iter(out.values())).shape == (2, 10)
    # The newest checkpoint is damaged in the bucket: set aside there, and
    # the run resumes from the one before, to the weights of a run never
    # interrupted.
    data = fileio.glob(fileio.join(url, "checkpoints"), "ckpt-60.data-*")[0]
    tf.io.gfile.remove(data)  # ram:// writes over nothing in place
    with tf.io.gfile.GFile(data, "w") as f:
        f.write("not a checkpoint")
    resumed = _weights_after(url, 80)
    assert fileio.exists(fileio.join(url, "checkpoints", "damaged", "ckpt-60.index"))
    assert resumed == _weights_after(str(tmp_path / "straight"), 80)


def test_a_bucket_that_cannot_be_reached_is_one_line_before_anything_starts(tmp_path):
    # No proxy listens where https_proxy points: every request fails at once.
    closed = {
        "https_proxy": "http://127.0.0.1:9",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "NO_GCE_CHECK": "true",
        "GCS_RETRY_CONFIG_MAX_RETRIES": "0",
    }
    for command in (["train"], ["launch", "--num_workers=2", "--"]):
        result = run_tftrain(
            *command,
            "--experiment=fashion_mnist_mlp:smoke",
            "--model_dir=gs://a-bucket/run",
            *(["--strategy=multi_worker_mirrored"] if "launch" in command else []),
            env=closed,
            check=False,
            cwd=str(tmp_path),
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(
            "tftrain: error: --model_dir=gs://a-bucket/run cannot be reached: "
        ), result.stderr
        assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


def test_a_bucket_failing_mid_run_is_one_line_and_a_blip_is_worth_a_retry():
    from tftrain.cli import _explain_bucket
    from tftrain.errors import EXIT_RETRY

    config = type("Config", (), {"model_dir": "gs://b/run"})()
    blip = tf.errors.UnavailableError(None, None, "reading gs://b/run/checkpoints: reset")
    said, code = _explain_bucket(blip, config)
    assert code == EXIT_RETRY and said.startswith("the bucket of --model_dir=gs://b/run failed")
    refused = tf.errors.PermissionDeniedError(None, None, "writing gs://b/run/x: 403")
    assert _explain_bucket(refused, config)[1] == 1
    assert _explain_bucket(tf.errors.UnavailableError(None, None, "gs://other/x"), config) is None
    local = type("Config", (), {"model_dir": "/runs/a"})()
    assert _explain_bucket(blip, local) is None

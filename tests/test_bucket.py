"""Runs whose ``--model_dir`` is a bucket on a real object-store server on
loopback: gcp-storage-emulator (a GCS server, from PyPI) behind
tests/gcs_proxy.py, with TensorFlow's own GCS filesystem pointed at it
through ``https_proxy`` and a test CA. Nothing of tftrain's is mocked."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import PAIR_FLAGS, ROOT, run_tftrain, start_tftrain
from tests.conftest import free_port as _free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BUCKET = "tftrain-test"
SMOKE = PAIR_FLAGS[:-1]  # a constant rate: a run stopped early starts a longer one


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(folder) -> tuple[str, str, str]:
    """A test CA and a certificate for Google's storage hosts signed by it."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=tftrain test CA", "-keyout", "ca.key", "-out", "ca.pem",
        cwd=folder,
    )  # fmt: skip
    with open(os.path.join(folder, "leaf.cnf"), "w") as f:
        f.write(
            "[req]\ndistinguished_name=dn\n[dn]\n[ext]\nbasicConstraints=CA:FALSE\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=DNS:www.googleapis.com,DNS:storage.googleapis.com\n"
        )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=www.googleapis.com",
        "-keyout", "leaf.key", "-out", "leaf.csr",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "leaf.cnf", "-extensions", "ext",
        "-out", "leaf.pem",
        cwd=folder,
    )  # fmt: skip
    return tuple(os.path.join(folder, n) for n in ("ca.pem", "leaf.pem", "leaf.key"))


class Bucket:
    """The emulator's bucket, read over its plain HTTP API (not through
    TensorFlow: what the tests check is what the server holds)."""

    def __init__(self, port: int, env: dict):
        self.api = f"http://127.0.0.1:{port}/storage/v1/b/{BUCKET}"
        self.port, self.env = port, env

    def names(self, prefix: str) -> set[str]:
        names, token = set(), None
        for _ in range(100):
            query = {"prefix": prefix + "/"} | ({"pageToken": token} if token else {})
            with urllib.request.urlopen(f"{self.api}/o?{urllib.parse.urlencode(query)}") as r:
                page = json.load(r)
            names |= {item["name"][len(prefix) + 1 :] for item in page.get("items", [])}
            token = page.get("nextPageToken")
            if not token:
                break
        return {n for n in names if n and not n.endswith("/")}

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.api}/o/{quoted}?alt=media") as r:
            return r.read()

    def write(self, name: str, data: bytes) -> None:
        url = (
            f"http://127.0.0.1:{self.port}/upload/storage/v1/b/{BUCKET}/o?"
            + urllib.parse.urlencode({"uploadType": "media", "name": name})
        )
        request = urllib.request.Request(url, data=data, method="POST")
        with urllib.request.urlopen(request) as r:
            r.read()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("the bucket tests need openssl (Debian: apt-get install openssl)")
    folder = str(tmp_path_factory.mktemp("gcs"))
    ca, cert, key = _make_certificates(folder)
    port = _free_port()
    log = open(os.path.join(folder, "servers.log"), "w")
    emulator = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "-q", "--default-bucket", BUCKET],
        stdout=log, stderr=log,
    )  # fmt: skip
    proxy = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "gcs_proxy.py"), str(port), cert, key],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        proxy_port = int(proxy.stdout.readline())
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/{BUCKET}").read()
                break
            except OSError:
                if time.monotonic() > deadline or emulator.poll() is not None:
                    log.flush()
                    pytest.fail("the GCS emulator did not start: " + open(log.name).read())
                time.sleep(0.2)
        env = {
            "https_proxy": f"http://127.0.0.1:{proxy_port}",
            "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}",
            "no_proxy": "",
            "NO_PROXY": "",
            "CURL_CA_BUNDLE": ca,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # no credentials to look up
            "NO_GCE_CHECK": "true",
            "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        }
        yield Bucket(port, env)
    finally:
        for server in (proxy, emulator):
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()


RUN_FILES = {
    "config.json",
    "metrics.json",
    "model.keras",
    "export/saved_model.pb",
    "checkpoints/checkpoint",
    "checkpoints/ckpt-60.index",
}


def _files_of_a_run(names) -> None:
    assert RUN_FILES <= names, sorted(names)
    for part in ("train", "eval"):
        assert any(re.match(rf"{part}/events\.out\.tfevents\.", n) for n in names), part
    assert not any(n.endswith(".tmp") or ".partial" in n for n in names), sorted(names)


def _predicts_as_recorded(bucket, run: str, cwd) -> None:
    """The export, loaded from the bucket, scores the test images as the
    run's metrics.json says."""
    recorded = json.loads(bucket.read(f"{run}/metrics.json"))
    script = (
        "import json, tensorflow as tf\n"
        "from tftrain import data\n"
        f"test = data.load('fashion_mnist').test.take({recorded['eval_examples']})\n"
        f"served = tf.saved_model.load('gs://{BUCKET}/{run}/export')\n"
        "images = tf.constant(test.images, tf.float32)\n"
        "logits = next(iter(served.signatures['serving_default'](images=images).values()))\n"
        "print(json.dumps(float((logits.numpy().argmax(-1) == test.labels).mean())))\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, **bucket.env, TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    accuracy = json.loads(got.stdout.splitlines()[-1])
    assert accuracy == pytest.approx(recorded["eval_accuracy"], abs=1e-6)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_two_worker_run_in_a_bucket_survives_a_killed_worker(
    bucket, tmp_path, two_launched_workers
):
    """Every file in the bucket, none in a local folder named after the URL;
    a worker SIGKILLed mid-run is restarted and the cluster resumes from the
    bucket's checkpoint, to the weights of a run never interrupted."""
    proc = start_tftrain(
        "launch",
        "--num_workers=2",
        "--max_restarts=1",
        "--",
        *SMOKE,
        "--strategy=multi_worker_mirrored",
        f"--model_dir=gs://{BUCKET}/mwms",
        "--collective_timeout_secs=60",
        env=bucket.env,
        cwd=str(tmp_path),
        stderr=subprocess.STDOUT,
    )
    try:
        started = ""
        for _ in range(200):
            line = proc.stdout.readline()
            started += line
            if m := re.search(r"started worker:1 \(pid (\d+)\)", line):
                break
        assert m, started
        _wait_for(
            lambda: "checkpoints/ckpt-20.index" in bucket.names("mwms") or proc.poll() is not None,
            240,
            "the first checkpoint in the bucket",
        )
        os.kill(int(m.group(1)), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
        out = started + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-6000:]
    assert "restarting the cluster from the last checkpoint" in out
    assert re.search(rf"Resumed from gs://{BUCKET}/mwms/checkpoints/ckpt-\d+", out)
    assert not os.path.exists(tmp_path / "gs:")  # nothing local named after the URL
    _files_of_a_run(bucket.names("mwms"))
    recorded = json.loads(bucket.read("mwms/metrics.json"))
    assert recorded["weights_sha256"] == two_launched_workers["weights_sha256"]
    _predicts_as_recorded(bucket, "mwms", tmp_path)


def test_a_parameter_server_run_in_a_bucket(bucket, tmp_path):
    result = run_tftrain(
        "launch",
        "--num_workers=2",
        "--num_ps=1",
        "--",
        *SMOKE,
        "--strategy=parameter_server",
        f"--model_dir=gs://{BUCKET}/ps",
        env=bucket.env,
        cwd=str(tmp_path),
    )
    assert f"metrics in gs://{BUCKET}/ps/metrics.json" in result.stdout
    assert os.listdir(tmp_path) == []
    _files_of_a_run(bucket.names("ps"))
    _predicts_as_recorded(bucket, "ps", tmp_path)


@pytest.mark.long  # tests/test_fileio.py does the same on ram://, in-process
def test_a_damaged_checkpoint_in_the_bucket_is_set_aside_there(bucket, tmp_path):
    run = f"gs://{BUCKET}/damaged"
    common = [*SMOKE, "--strategy=one_device", f"--model_dir={run}"]
    run_tftrain("train", *common, "--train_steps=40", env=bucket.env, cwd=str(tmp_path))
    data = next(n for n in bucket.names("damaged") if n.startswith("checkpoints/ckpt-40.data"))
    bucket.write(f"damaged/{data}", b"not a checkpoint")
    result = run_tftrain("train", *common, env=bucket.env, cwd=str(tmp_path))
    assert f"Checkpoint {run}/checkpoints/ckpt-40 is damaged" in result.stdout
    assert f"Resumed from {run}/checkpoints/ckpt-20 at step 20" in result.stdout
    names = bucket.names("damaged")
    assert {"checkpoints/damaged/ckpt-40.index", "checkpoints/ckpt-60.index"} <= names
    straight = str(tmp_path / "straight")
    run_tftrain("train", *SMOKE, "--strategy=one_device", f"--model_dir={straight}")
    with open(os.path.join(straight, "metrics.json")) as f:
        expected = json.load(f)["weights_sha256"]
    assert json.loads(bucket.read("damaged/metrics.json"))["weights_sha256"] == expected

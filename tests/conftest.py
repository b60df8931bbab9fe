"""Shared test set-up.

The test process runs TensorFlow with two logical CPU devices, so that
MirroredStrategy with 2 replicas runs in-process on this CPU-only machine.
They must be configured before any other TensorFlow work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tftrain  # noqa: F401  (its TensorFlow defaults, oneDNN among them, before TensorFlow loads)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_configure(config):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail(
            f"Fashion-MNIST is missing from {FASHION_MNIST_DIR}: "
            "apt-get install dataset-fashion-mnist (.ci/run does)."
        )
    return FASHION_MNIST_DIR


def _tftrain_env(env: dict | None = None) -> dict:
    """This process's environment for a tftrain child: unbuffered, quiet, and
    without this process's TF_CONFIG; ``env`` on top."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    full_env.pop("TF_CONFIG", None)
    full_env.update(env or {})
    return full_env


def start_tftrain(
    *args: str,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env: dict | None = None,
    cwd: str | None = None,
) -> subprocess.Popen:
    """Starts ``python -m tftrain ARGS`` as a user would (text pipes by default)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tftrain", *args],
        cwd=cwd or ROOT,
        env=_tftrain_env(env),
        stdout=stdout,
        stderr=stderr,
        text=True,
    )


def run_tftrain(
    *args: str,
    env: dict | None = None,
    timeout: float = 600,
    check: bool = True,
    cwd: str | None = None,
) -> subprocess.CompletedProcess:
    """Runs ``python -m tftrain ARGS`` as a user would, capturing its output."""
    result = subprocess.run(
        [sys.executable, "-m", "tftrain", *args],
        cwd=cwd or ROOT,
        env=_tftrain_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"tftrain {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


# A short multi-worker run, compared with the same run elsewhere (a bucket,
# two launchers, Slurm): a constant rate, so a run resumed from any
# checkpoint ends as an uninterrupted one. One intra-op thread in every
# task, however it was started: on an AVX2 CPU a matrix product split over
# two threads sums in another order and ends a few bits apart.
PAIR_FLAGS = [
    "--experiment=fashion_mnist_mlp:smoke",
    "--intra_op_threads=1",
    "--train_steps=60",
    "--steps_per_loop=20",
    "--lr_schedule=constant",
    "--strategy=multi_worker_mirrored",
]


@pytest.fixture(scope="session")
def two_launched_workers(tmp_path_factory) -> dict:
    """metrics.json of ``tftrain launch --num_workers=2 -- PAIR_FLAGS``, run
    once for every test that compares weights with it."""
    model_dir = str(tmp_path_factory.mktemp("pair") / "run")
    run_tftrain("launch", "--num_workers=2", "--", *PAIR_FLAGS, f"--model_dir={model_dir}")
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def free_port() -> int:
    """A loopback port free now (released at once, for a server about to start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(pid) -> list | None:
    """The fields of ``/proc/PID/stat`` after the command name (which may
    hold spaces and parentheses): [0] the state, [1] the parent's pid, [19]
    the start time. None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie) and, given
    ``started``, still the one that started then (not a later process given
    the same pid)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z" and started in (None, fields[19])


def read_until(proc, pattern, lines, timeout=180):
    """Reads ``proc``'s text stdout line by line (kept in ``lines``) until one
    matches ``pattern``; returns the match, or fails with the last lines."""
    import re
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(lines[-40:])}")

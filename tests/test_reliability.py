"""No silent data loss, no silent divergence, no lost work on SIGTERM: the
CLI run as a user would, with its files damaged and its process signalled."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_tftrain, start_tftrain

pytestmark = pytest.mark.slow

# A constant rate: a 60-step run resumed to 80 steps is then the 80-step run.
SMOKE = [
    "--experiment=fashion_mnist_mlp:smoke",
    "--lr_schedule=constant",
    "--steps_per_loop=10",
    "--checkpoint_interval=20",
]


def metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)  # strict JSON: NaN would not parse with parse_constant below


def strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def train(model_dir, steps, *extra, check=True):
    return run_tftrain(
        "train", *SMOKE, f"--train_steps={steps}", f"--model_dir={model_dir}", *extra, check=check
    )


@pytest.fixture(scope="module")
def straight_80(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("straight") / "run")
    train(model_dir, 80)
    return metrics(model_dir)


def _ckpt(model_dir, step, suffix):
    return os.path.join(model_dir, "checkpoints", f"ckpt-{step}{suffix}")


@pytest.mark.parametrize(
    "damage",
    ["delete the index", "truncate the data", "random bytes in the index"],
)
def test_a_damaged_latest_checkpoint_is_named_set_aside_and_the_previous_one_used(
    tmp_path, straight_80, damage
):
    model_dir = str(tmp_path / "run")
    train(model_dir, 60)
    index, data = _ckpt(model_dir, 60, ".index"), _ckpt(model_dir, 60, ".data-00000-of-00001")
    if damage == "delete the index":
        os.remove(index)
    elif damage == "truncate the data":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    else:
        with open(index, "wb") as f:
            f.write(os.urandom(300))
    result = train(model_dir, 80)
    assert f"Checkpoint {_ckpt(model_dir, 60, '')} is damaged" in result.stdout
    assert f"Resumed from {_ckpt(model_dir, 40, '')} at step 40." in result.stdout
    kept = os.listdir(os.path.join(model_dir, "checkpoints", "damaged"))
    assert any(name.startswith("ckpt-60.") for name in kept)  # set aside, not deleted
    assert os.path.exists(_ckpt(model_dir, 40, ".index"))
    got = metrics(model_dir)
    assert got["global_step"] == 80
    assert got["weights_sha256"] == straight_80["weights_sha256"]  # an exact resume


def test_without_the_state_file_the_newest_step_wins_and_the_rotation_holds(tmp_path):
    import shutil

    model_dir = str(tmp_path / "run")
    folder = os.path.join(model_dir, "checkpoints")
    train(model_dir, 80)  # keeps ckpt-40, -60, -80
    os.remove(os.path.join(folder, "checkpoint"))
    for suffix in (".index", ".data-00000-of-00001"):  # a stray copy of step 40
        shutil.copy(_ckpt(model_dir, 40, suffix), _ckpt(model_dir, 999, suffix))
    os.makedirs(_ckpt(model_dir, 100, "_temp"))  # what a save cut off leaves
    result = train(model_dir, 100)
    assert f"Resumed from {_ckpt(model_dir, 80, '')} at step 80." in result.stdout
    left = sorted(n.split(".")[0] for n in os.listdir(folder) if n.endswith(".index"))
    assert left == ["ckpt-100", "ckpt-60", "ckpt-80"]  # --keep_checkpoints=3 after the repair
    assert not os.path.exists(_ckpt(model_dir, 100, "_temp"))


def test_when_every_checkpoint_is_damaged_the_run_refuses_and_changes_nothing(tmp_path):
    model_dir = str(tmp_path / "run")
    train(model_dir, 40)
    for step in (20, 40):
        os.remove(_ckpt(model_dir, step, ".index"))
    before = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    result = train(model_dir, 60, check=False)
    assert result.returncode == 2
    assert "every checkpoint in" in result.stderr and "will not start again from step 0" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == before
    # Asked to, it starts afresh, and the damaged run's files are kept aside.
    result = train(model_dir, 20, "--restart")
    aside = os.path.join(model_dir, "previous", "1")
    assert f"moved the earlier run's files to {aside}" in result.stdout
    assert sorted(os.listdir(os.path.join(aside, "checkpoints"))) == before
    assert metrics(model_dir)["global_step"] == 20
    assert not os.path.exists(os.path.join(model_dir, "previous", "2"))


def test_restart_is_refused_to_one_task_of_a_cluster(tmp_path):
    spec = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    config = json.dumps({"cluster": spec, "task": {"type": "worker", "index": 0}})
    result = run_tftrain(
        "train",
        *SMOKE,
        "--strategy=multi_worker_mirrored",
        f"--model_dir={tmp_path}",
        "--restart",
        env={"TF_CONFIG": config},
        check=False,
    )
    assert result.returncode == 2 and "use tftrain launch ... -- --restart" in result.stderr


def test_a_diverging_run_stops_loudly_and_exports_nothing(tmp_path):
    model_dir = str(tmp_path / "run")
    result = train(model_dir, 60, "--optimizer=sgd", "--learning_rate=1e8", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "tftrain: error: the training loss became nan in steps" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists(os.path.join(model_dir, "export"))
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    strict_json(os.path.join(model_dir, "config.json"))


def test_a_run_that_diverged_but_stayed_finite_is_not_exported(tmp_path):
    # Adam at 1e6 keeps every number finite but leaves the model worse than
    # the untrained one: a failure, not a result.
    model_dir = str(tmp_path / "run")
    result = train(model_dir, 60, "--learning_rate=1e6", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the trained model is worse than the untrained one (step 60" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists(os.path.join(model_dir, "export"))
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    # The same command again resumes from a checkpoint before the end and
    # ends the same way: the untrained model's figures are checkpointed.
    again = train(model_dir, 60, "--learning_rate=1e6", check=False)
    assert "Resumed from" in again.stdout
    assert again.returncode == 1 and "worse than the untrained one" in again.stderr
    assert not os.path.exists(os.path.join(model_dir, "export"))


def test_skipping_nonfinite_updates_counts_them_and_still_exports_no_nan_model(tmp_path):
    model_dir = str(tmp_path / "run")
    result = train(
        model_dir, 60, "--optimizer=sgd", "--learning_rate=1e8", "--on_nan=skip_step", check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "update(s) so far (non-finite)" in result.stdout
    assert "tftrain: error: the evaluation loss at step 20 is nan" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists(os.path.join(model_dir, "export"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_saves_the_current_step_and_the_run_resumes_exactly(tmp_path, straight_80, sig):
    # SIGHUP: the terminal closed. Answered as SIGTERM is, with its own code.
    model_dir = str(tmp_path / "run")
    # Checkpoints only at the end: whatever is saved early is the signal's doing.
    proc = start_tftrain(
        "train",
        *SMOKE,
        "--train_steps=80",
        "--checkpoint_interval=1000",
        "--log_interval_secs=0",
        f"--model_dir={model_dir}",
    )
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step ") or time.time() > deadline:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, out + err
    assert f"{sig.name}: saving a checkpoint" in err
    said = [line for line in out.splitlines() if line.startswith("Stopped at step")]
    assert said, out
    step = int(said[0].split()[3].split("/")[0])
    assert 0 < step < 80 and os.path.exists(_ckpt(model_dir, step, ".index"))
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))

    resumed = train(model_dir, 80)
    assert f"at step {step}." in resumed.stdout
    assert metrics(model_dir)["weights_sha256"] == straight_80["weights_sha256"]


def _one_long_loop(model_dir: str):
    """A run of one loop of 100,000 steps (about 100 s): its main thread sits
    in one TensorFlow call all the while."""
    return start_tftrain(
        "train",
        *SMOKE[:2],
        "--train_steps=100000",
        "--steps_per_loop=100000",
        "--eval_interval=100000",
        "--checkpoint_interval=100000",
        f"--model_dir={model_dir}",
    )


class _Lines:
    """The lines of a text stream, read by a thread of their own, so that a
    test can wait for one with a deadline."""

    def __init__(self, stream):
        import queue
        import threading

        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, wanted: str, seconds: float) -> str | None:
        """The first line containing ``wanted`` within ``seconds``, or None."""
        import queue

        deadline = time.time() + seconds
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.time(), 0.001))
            except queue.Empty:
                return None
            if line is None:
                return None
            if wanted in line:
                return line


def test_signals_are_answered_at_once_even_inside_a_long_loop(tmp_path):
    # One loop of 100,000 steps: the main thread sits in one TensorFlow call.
    # The first signal is acknowledged at once; the second ends the process.
    proc = _one_long_loop(str(tmp_path / "run"))
    out, err = _Lines(proc.stdout), _Lines(proc.stderr)
    try:
        assert out.wait_for("eval at step 0", 120), "the run did not start"
        # Tracing the step takes a second or two; the loop (about 100 s of
        # steps) runs after it.
        time.sleep(6)
        proc.send_signal(signal.SIGTERM)
        assert err.wait_for("SIGTERM: saving a checkpoint", 10), (
            "the first signal was not acknowledged while the loop ran"
        )
        proc.send_signal(signal.SIGTERM)
        assert err.wait_for("SIGTERM again: stopping now", 10)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not os.path.exists(tmp_path / "run" / "metrics.json")


def test_each_signal_is_answered_once_even_when_the_wakeup_descriptor_is_taken():
    code = """
import os, signal, sys, time
from tftrain.stopping import StopRequest
stop = StopRequest().install().install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
print("requested", stop.requested, flush=True)
signal.set_wakeup_fd(-1)  # another library takes the wake-up descriptor
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.splitlines() == ["requested True"], result.stdout + result.stderr
    assert result.stderr.count("SIGTERM: saving a checkpoint") == 1, result.stderr
    assert "SIGINT again: stopping now" in result.stderr
    assert result.returncode == 128 + signal.SIGINT


def test_a_relative_model_dir_resumes_its_own_checkpoints(tmp_path, monkeypatch):
    """The README's main command names a relative --model_dir; its checkpoints
    must be found whole on the next run, not reported damaged."""
    import tensorflow as tf

    from tftrain import checkpoints

    monkeypatch.chdir(tmp_path)
    variable = tf.Variable(1.0)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(v=variable), "runs/main/checkpoints", max_to_keep=3
    )
    for step in (1, 2):
        manager.save(checkpoint_number=step)
    found = checkpoints._candidates(
        "runs/main/checkpoints", checkpoints._recorded("runs/main/checkpoints")
    )
    assert found == ["runs/main/checkpoints/ckpt-2", "runs/main/checkpoints/ckpt-1"]
    assert all(checkpoints.damage(prefix) is None for prefix in found)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system (a tmpfs: mounting one needs root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_said_in_one_line_and_keeps_the_checkpoint(small_disk):
    from tftrain import checkpoints

    model_dir = os.path.join(small_disk, "run")
    # The MLP's checkpoint (2.8 MB) fits; the SavedModel after it does not.
    result = train(model_dir, 20, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "tftrain: error: the disk is full (No space left on device)" in result.stderr
    assert "resume from the last checkpoint (ckpt-20), which is kept" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists(os.path.join(model_dir, "export.partial"))
    assert checkpoints.damage(_ckpt(model_dir, 20, "")) is None


def test_a_full_disk_before_any_checkpoint_does_not_promise_one(small_disk):
    model_dir = os.path.join(small_disk, "run")
    # Its first checkpoint (Adam: 3 copies of 1.8M weights) cannot fit.
    result = train(model_dir, 20, "--hidden_units=1024,1024", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "start again (no checkpoint had been saved yet)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_checkpoint_without_the_model_state_resumes_and_says_so(tmp_path):
    # Checkpoints written before the model's non-trainable state was saved
    # (a dropout layer's seed) still resume, with a line saying what differs.
    import tensorflow as tf

    from tftrain import checkpoints, controller

    model_dir = str(tmp_path)

    def open_checkpoints(objects, logged):
        return checkpoints.Checkpoints(
            model_dir=model_dir,
            out=controller._Output(model_dir, True, 0),
            objects=objects,
            step_counter=objects["global_step"],
            keep=3,
            is_chief=True,
            log=logged.append,
        )

    step = tf.Variable(7, dtype=tf.int64)
    old = {"model": tf.train.Checkpoint(w=tf.Variable(3.0)), "global_step": step}
    open_checkpoints(old, []).save(7)

    weights = tf.Variable(0.0)
    seed = tf.Variable([5, 0], dtype=tf.int64, name="seed_generator/seed_generator_state")
    step = tf.Variable(0, dtype=tf.int64)
    new = {
        "model": tf.train.Checkpoint(w=weights),
        "model_state": [seed],
        "global_step": step,
    }
    logged = []
    assert open_checkpoints(new, logged).restore_latest().endswith("ckpt-7")
    assert (weights.numpy(), step.numpy(), seed.numpy().tolist()) == (3.0, 7, [5, 0])
    assert any("other dropout masks" in line for line in logged)


def test_restart_that_cannot_set_the_run_aside_says_so_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "previous").write_text("not a folder")
    result = run_tftrain(
        "train",
        "--experiment=fashion_mnist_softmax",
        "--train_steps=5",
        "--restart",
        f"--model_dir={tmp_path}",
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "previous is a file" in result.stderr and "Nothing was moved" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "previous"]


def test_a_folder_with_a_live_run_refuses_a_second_run_and_a_restart(tmp_path):
    model_dir = str(tmp_path / "run")
    # A run of a million steps trains all through the attempts, then is
    # stopped by SIGTERM at the step it reached.
    flags = [*SMOKE[:3], "--checkpoint_interval=1000000", "--eval_interval=1000000"]
    live = start_tftrain("train", *flags, "--train_steps=1000000", f"--model_dir={model_dir}")
    out = _Lines(live.stdout)
    try:
        assert out.wait_for("eval at step 0", 120), "the run did not start"
        for attempt in (
            ["train", *SMOKE, "--seed=3", "--train_steps=40"],
            ["train", *SMOKE, "--restart", "--train_steps=40"],
            ["launch", "--num_workers=2", "--", *SMOKE, "--strategy=multi_worker_mirrored"],
        ):
            result = run_tftrain(*attempt, f"--model_dir={model_dir}", check=False)
            said = result.stderr.strip().splitlines()
            assert result.returncode == 2, result.stdout + result.stderr
            assert said[-1].startswith(f"tftrain: error: --model_dir={model_dir} is in use by "), (
                said
            )
            assert f"pid {live.pid} on " in said[-1] and "Traceback" not in result.stderr
            assert "previous" not in os.listdir(model_dir)  # --restart moved nothing
        assert live.poll() is None
        live.send_signal(signal.SIGTERM)
        stopped = out.wait_for("Stopped at step", 60)
        assert live.wait(timeout=60) == 128 + signal.SIGTERM and stopped, stopped
    finally:
        live.kill()
        live.wait()
    # The kernel let go of the lock with the process: the same command
    # resumes there, and the run ends as one nobody disturbed.
    step = int(stopped.split()[3].split("/")[0]) + 10
    resumed = run_tftrain("train", *flags, f"--train_steps={step}", f"--model_dir={model_dir}")
    assert f"at step {step - 10}." in resumed.stdout, resumed.stdout
    alone = str(tmp_path / "alone")
    run_tftrain("train", *flags, f"--train_steps={step}", f"--model_dir={alone}")
    assert metrics(model_dir)["weights_sha256"] == metrics(alone)["weights_sha256"]

"""--strategy=parameter_server: a coordinator, workers and a ps as local
processes on loopback ports, for real; failures injected with SIGKILL."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from tests.conftest import ROOT, run_tftrain
from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute import cluster as cluster_lib
from tftrain.distribute.base import mode_for

SMOKE = ["--experiment=fashion_mnist_mlp:smoke", "--strategy=parameter_server"]


def metrics(model_dir):
    return json.load(open(os.path.join(model_dir, "metrics.json")))


def checkpointed(model_dir, name):
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))


def tf_config(spec, task_type="chief", index=0):
    return cluster_lib.parse_tf_config(
        json.dumps({"cluster": spec, "task": {"type": task_type, "index": index}})
    )


PS_CLUSTER = {"chief": ["h:1"], "worker": ["h:2", "h:3"], "ps": ["h:4"]}


@pytest.mark.parametrize(
    "spec, task, message",
    [
        (None, None, "needs a TF_CONFIG cluster with ps tasks"),
        ({"worker": ["h:1", "h:2"]}, ("worker", 0), "needs a TF_CONFIG cluster with ps tasks"),
        ({"worker": ["h:1"], "ps": ["h:2"]}, ("worker", 0), "needs chief task(s)"),
        ({"chief": ["h:1"], "ps": ["h:2"]}, ("chief", 0), "needs worker task(s)"),
    ],
)
def test_clusters_that_cannot_run_parameter_servers_are_refused(spec, task, message):
    config = ExperimentConfig(strategy="parameter_server", model_dir="/unused").validate()
    info = tf_config(spec, *task) if spec else None
    with pytest.raises(ConfigError) as e:
        mode_for(config, info)
    assert message in str(e.value)


def test_roles_and_threads_of_a_parameter_server_cluster():
    config = ExperimentConfig(strategy="parameter_server", model_dir="/unused").validate()
    mode = mode_for(config, tf_config(PS_CLUSTER, "ps", 0))
    assert "ps" in mode.serving_roles and "worker" in mode.serving_roles
    assert mode.training_roles == {"chief"}
    assert mode.default_threads()[1] >= 3  # workers + 1, or a small machine deadlocks
    assert mode.loops_between_syncs == 4


def test_an_evaluator_task_is_taken_only_beside_parameter_servers(tmp_path):
    config = ExperimentConfig(strategy="parameter_server", model_dir="/unused").validate()
    mode = mode_for(config, tf_config(dict(PS_CLUSTER, evaluator=["h:5"]), "evaluator", 0))
    assert mode.takes_evaluator and not mode.serves(mode.cluster)
    result = run_tftrain(
        "launch",
        "--num_workers=1",
        "--evaluator",
        "--",
        *SMOKE,
        f"--model_dir={tmp_path}/r",
        check=False,
    )
    assert result.returncode == 2
    assert "--evaluator needs parameter servers (--num_ps=M)" in result.stderr


def test_launch_without_ps_is_a_usage_error(tmp_path):
    result = run_tftrain(
        "launch", "--num_workers=2", "--", *SMOKE, f"--model_dir={tmp_path}/run", check=False
    )
    assert result.returncode != 0
    assert "needs a TF_CONFIG cluster with ps tasks" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


class Launch:
    """A `tftrain launch` whose output is read line by line as it comes."""

    def __init__(self, *args):
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("TF_CONFIG", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tftrain", "launch", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 240.0) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"no line matched {pattern!r}:\n" + "\n".join(self.lines[-60:]))

    def finish(self, timeout: float = 300.0) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the launch did not end:\n" + self.text) from None
        self._reader.join(10)
        return code

    def kill(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.mark.cluster
def test_parameter_server_run_writes_everything_and_counts_every_step(tmp_path):
    model_dir = str(tmp_path / "ps")
    command = (
        "--num_workers=2",
        "--num_ps=1",
        "--evaluator",
        "--",
        *SMOKE,
        "--train_steps=200",
        "--checkpoint_interval=100",
        f"--model_dir={model_dir}",
    )
    run = Launch(*command)
    assert run.finish() == 0, run.text
    got = metrics(model_dir)
    # The evaluator evaluated the checkpoints beside the run, the last one too,
    # with the chief's figures for the same weights, then left on its own.
    evaluated = json.load(open(os.path.join(model_dir, "evaluator", "metrics.json")))
    assert evaluated["step"] == 200 and evaluated["loss"] == got["eval_loss"]
    assert [e["step"] for e in evaluated["evaluated"]][-1] == 200
    assert "[evaluator:0] evaluator: the chief is done" in run.text
    assert any(n.startswith("events.out") for n in os.listdir(os.path.join(model_dir, "evaluator")))
    assert got["strategy"] == "parameter_server"
    assert (got["num_workers"], got["num_ps"], got["global_step"]) == (2, 1, 200)
    # Every applied update counted once, by the step and by the optimizer.
    assert checkpointed(model_dir, "global_step") == 200
    assert checkpointed(model_dir, "optimizer/_iterations") == 200
    for folder in ("train", "eval", "export", "checkpoints"):
        assert os.listdir(os.path.join(model_dir, folder)), folder
    # Every update's staleness: in metrics.json, and in TensorBoard as
    # scalars and a histogram.
    stale = got["staleness"]
    assert stale["updates"] == 200 and sum(stale["histogram"]) == 200
    assert 0 <= stale["mean"] <= stale["max"] < 64
    tags = {
        value.tag
        for name in os.listdir(os.path.join(model_dir, "train"))
        for event in tf.compat.v1.train.summary_iterator(os.path.join(model_dir, "train", name))
        for value in event.summary.value
    }
    assert {"staleness/mean", "staleness/max", "staleness"} <= tags
    # The ps and the workers served, saw the coordinator go, and left by themselves.
    for task in ("worker:0", "worker:1", "ps:0"):
        assert f"[{task}] {task} joined the coordinator's run." in run.text
    assert "[launch] every task finished." in run.text

    # The same command again: the chief finds the run finished, every task
    # takes its word, and metrics.json stays byte for byte.
    with open(os.path.join(model_dir, "metrics.json"), "rb") as f:
        record = f.read()
    again = Launch(*command)
    assert again.finish() == 0, again.text
    assert "This run already finished at step 200 of 200" in again.text
    with open(os.path.join(model_dir, "metrics.json"), "rb") as f:
        assert f.read() == record

    # The checkpoint restores into a one_device run, which trains on.
    more = run_tftrain("train", *SMOKE[:1], "--train_steps=260", f"--model_dir={model_dir}")
    assert "at step 200." in more.stdout
    assert (
        metrics(model_dir)["global_step"] == 260 and metrics(model_dir)["strategy"] == "one_device"
    )


@pytest.mark.cluster
def test_an_embedding_table_split_over_two_ps_trains_as_the_whole_table(tmp_path):
    """One worker takes the same batches in the same order as one device, so
    the runs agree bit for bit; the table's two shards live on the two ps."""
    flags = [
        "--dataset=synthetic_tokens",
        "--model=embedding_bag",
        "--optimizer=adam",
        "--learning_rate=0.01",
        "--batch_size=64",
        "--train_steps=120",
        "--steps_per_loop=20",
        "--noexport",
    ]
    split, whole = str(tmp_path / "split"), str(tmp_path / "whole")
    run = Launch(
        "--num_workers=1",
        "--num_ps=2",
        "--",
        *flags,
        "--strategy=parameter_server",
        "--embedding_shards=2",
        f"--model_dir={split}",
    )
    assert run.finish() == 0, run.text
    run_tftrain("train", *flags, f"--model_dir={whole}")
    got, expected = metrics(split), metrics(whole)
    assert got["ps_variables"]["ps:0"][0] == "embedding/embeddings_0"
    assert got["ps_variables"]["ps:1"][0] == "embedding/embeddings_1"
    assert got["weights_sha256"] == expected["weights_sha256"]
    assert got["eval_loss"] == expected["eval_loss"] and got["global_step"] == 120


@pytest.mark.cluster
def test_one_worker_is_never_stale(tmp_path):
    """With one worker no other update can land inside a step: every update's
    staleness is 0 (a count that ran a read out of order would show here)."""
    model_dir = str(tmp_path / "ps1")
    run = Launch(
        "--num_workers=1",
        "--num_ps=1",
        "--",
        *SMOKE,
        "--train_steps=100",
        f"--model_dir={model_dir}",
    )
    assert run.finish() == 0, run.text
    assert metrics(model_dir)["staleness"] == {
        "mean": 0.0,
        "max": 0,
        "updates": 100,
        "histogram": [100],
    }
    assert "staleness 0.00 (max 0)" in run.text


@pytest.mark.cluster
@pytest.mark.slow
def test_a_killed_worker_rejoins_and_the_run_finishes_exactly(tmp_path):
    model_dir = str(tmp_path / "ps")
    run = Launch(
        "--num_workers=2",
        "--num_ps=1",
        "--",
        *SMOKE,
        "--train_steps=3000",
        "--steps_per_loop=20",
        "--log_interval_secs=0",
        f"--model_dir={model_dir}",
    )
    pid = int(run.wait_for(r"started worker:1 \(pid (\d+)\)").group(1))
    run.wait_for(r"\[chief:0\] step (1[0-9]{3}|[6-9][0-9]{2})/3000")
    os.kill(pid, signal.SIGKILL)
    assert run.finish() == 0, run.text
    assert "worker:1 exited with -9; restarting it" in run.text
    assert run.text.count("[worker:1] worker:1 joined the coordinator's run.") == 2
    got = metrics(model_dir)
    assert got["global_step"] == 3000 and checkpointed(model_dir, "global_step") == 3000
    assert got["eval_accuracy"] > 0.7


@pytest.mark.cluster
@pytest.mark.slow
def test_a_killed_ps_ends_the_run_or_restarts_the_cluster_from_a_checkpoint(tmp_path):
    model_dir = str(tmp_path / "ps")
    common = [
        "--",
        *SMOKE,
        "--train_steps=3000",
        "--steps_per_loop=20",
        "--checkpoint_interval=200",
        "--log_interval_secs=0",
        f"--model_dir={model_dir}",
    ]
    run = Launch("--num_workers=2", "--num_ps=1", "--max_restarts=1", *common)
    pid = int(run.wait_for(r"started ps:0 \(pid (\d+)\)").group(1))
    run.wait_for(r"\[chief:0\] step (1[0-9]{3}|[6-9][0-9]{2})/3000")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    run.wait_for(r"restarting the cluster from the last checkpoint \(1/1\)")
    assert time.time() - killed_at < 60
    assert run.finish() == 0, run.text
    lost = re.search(r"\[chief:0\] tftrain: error: lost contact with ([^(]*) \(", run.text)
    # The chief names the task it lost by its role and address.
    assert lost and lost.group(1).startswith("ps:0 at 127.0.0.1:"), run.text
    assert re.search(r"\[chief:0\] Resumed from .*ckpt-\d+ at step \d+\.", run.text)
    assert metrics(model_dir)["global_step"] == 3000


def test_flags_that_contradict_the_coordinators_are_named():
    from tftrain.distribute import serving

    chief = json.loads(json.dumps(ExperimentConfig(model_dir="/r", hidden_units=(8,)).to_dict()))
    mine = ExperimentConfig(model_dir="/r", hidden_units=(8,), inter_op_threads=3).to_dict()
    assert serving.contradictions(mine, chief) == []  # thread settings are each task's own
    mine = ExperimentConfig(model_dir="/r", hidden_units=(8, 4), learning_rate=0.5).to_dict()
    assert serving.contradictions(mine, chief) == [
        "--hidden_units=[8, 4] here, [8] on the coordinator",
        "--learning_rate=0.5 here, 0.001 on the coordinator",
    ]


@pytest.mark.cluster
def test_a_ps_task_started_with_other_flags_says_so_and_the_run_stops(tmp_path):
    from tftrain.distribute import launch

    spec = launch.free_cluster_spec(1, 1)
    flags = [*SMOKE, f"--model_dir={tmp_path / 'run'}", "--collective_timeout_secs=60"]
    tasks = {}
    for task_type, extra in (("ps", ["--learning_rate=0.5"]), ("worker", []), ("chief", [])):
        env = launch.task_env(spec, task_type, 0)
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        tasks[task_type] = subprocess.Popen(
            [sys.executable, "-m", "tftrain", "train", *flags, *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    try:
        _, said = tasks["ps"].communicate(timeout=240)
        assert tasks["ps"].returncode == 2, said
        assert "ps:0 was started with flags that contradict the coordinator's" in said
        assert "--learning_rate=0.5 here, 0.001 on the coordinator" in said
        tasks["chief"].communicate(timeout=240)
        assert tasks["chief"].returncode != 0  # the run cannot go on without its ps
    finally:
        for process in tasks.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

"""tftrain launch: local clusters on loopback ports, for real."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, run_tftrain, start_tftrain
from tests.conftest import alive as _alive
from tests.conftest import read_until as _read_until
from tftrain.distribute import launch

pytestmark = pytest.mark.cluster

SMOKE = ["--experiment=fashion_mnist_mlp:smoke", "--train_steps=60", "--steps_per_loop=20"]


def metrics(model_dir):
    return json.load(open(os.path.join(model_dir, "metrics.json")))


def test_reserved_ports_are_distinct_and_the_cluster_is_well_formed():
    ports, sockets = launch.reserve_ports(5)
    try:
        assert len(set(ports)) == 5
        spec = launch.cluster_spec(2, 2, ports)
        assert spec["chief"] == [f"127.0.0.1:{ports[0]}"] and len(spec["ps"]) == 2
        assert launch.tasks_of(spec) == [
            ("chief", 0),
            ("worker", 0),
            ("worker", 1),
            ("ps", 0),
            ("ps", 1),
        ]
        env = launch.task_env(spec, "worker", 1)
        assert json.loads(env["TF_CONFIG"])["task"] == {"type": "worker", "index": 1}
        assert env["GRPC_FAIL_FAST"] == "use_caller"
        flags = launch.task_flags(threads=1, num_workers=2)
        assert "--intra_op_threads=1" in flags and "--nothread_spinning" in flags
        assert "--inter_op_threads=3" in flags
    finally:
        for s in sockets:
            s.close()


def test_tfjob_manifest():
    result = run_tftrain(
        "launch",
        "--num_workers=4",
        "--emit=tfjob",
        "--image=me/tftrain:1",
        "--",
        "--experiment=fashion_mnist_mlp",
        "--strategy=multi_worker_mirrored",
        "--model_dir=gs://b/run",
    )
    text = result.stdout
    assert "kind: TFJob" in text and "apiVersion: kubeflow.org/v1" in text
    assert "Worker:" in text and "replicas: 4" in text and "PS:" not in text
    assert '"me/tftrain:1"' in text
    command = json.loads(re.search(r"command: (\[.*\])", text).group(1))
    assert command == [
        "tftrain",
        "train",
        "--inter_op_threads=5",  # workers + 1, as the local launcher sets
        "--ring_port=2223",
        "--experiment=fashion_mnist_mlp",
        "--strategy=multi_worker_mirrored",
        "--model_dir=gs://b/run",
    ]
    # Every port tftrain opens is declared, and each task asks for resources.
    assert "containerPort: 2222" in text and "containerPort: 2223" in text
    assert 'cpu: "2"' in text and 'memory: "4Gi"' in text


def test_tfjob_manifest_of_a_parameter_server_cluster_with_an_evaluator():
    result = run_tftrain(
        "launch",
        "--num_workers=2",
        "--num_ps=1",
        "--evaluator",
        "--emit=tfjob",
        "--",
        "--experiment=fashion_mnist_mlp",
        "--strategy=parameter_server",
        "--model_dir=gs://b/runs/a",
    )
    roles = dict(re.findall(r"^    (\w+):\n      replicas: (\d+)$", result.stdout, re.M))
    assert roles == {"Chief": "1", "Worker": "2", "PS": "1", "Evaluator": "1"}
    without = run_tftrain(
        "launch",
        "--num_workers=2",
        "--num_ps=1",
        "--emit=tfjob",
        "--",
        "--strategy=parameter_server",
        "--model_dir=gs://b/runs/a",
    )
    assert "Evaluator:" not in without.stdout and "PS:" in without.stdout


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--", "--optimizer=bogus"], "--optimizer=bogus"),
        (["--", "--model_dir=runs/a"], "--model_dir=runs/a is relative"),
        (["--job_name=My_Job", "--", "--model_dir=gs://b/r"], "--job_name='My_Job'"),
        (["--", "--strategy=one_device", "--model_dir=gs://b/r"], "one_device runs in one process"),
        (["--task_memory=lots", "--", "--model_dir=gs://b/r"], "--task_memory='lots'"),
        (["--task_cpu=0", "--", "--model_dir=gs://b/r"], "--task_cpu='0': expected more than"),
        (["--task_memory=0Gi", "--", "--model_dir=gs://b/r"], "--task_memory='0Gi': expected"),
        (["--", "--model_dir=gs://b/r", "--no_such_flag=1"], "no_such_flag"),
        (["--", "--model_dir=gs://b/r", "--batch_size=99"], "--batch_size=99 does not split"),
    ],
)
def test_tfjob_refuses_what_its_pods_would_refuse(flags, said):
    emit = ["--num_workers=2", "--emit=tfjob", *flags]
    if "--strategy=one_device" not in flags:
        emit.append("--strategy=multi_worker_mirrored")
    if not any(f.startswith("--model_dir") for f in flags):
        emit.append("--model_dir=gs://b/r")
    result = run_tftrain("launch", *emit, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # nothing printed but the error
    assert said in result.stderr and result.stderr.startswith("tftrain: error: ")


@pytest.mark.parametrize(
    "bad, said",
    [
        ("--optimizer=bogus", "--optimizer=bogus"),
        ("--batch_size=99", "--batch_size=99 does not split evenly over 2 workers"),
    ],
)
def test_a_launch_with_bad_training_flags_starts_no_task(tmp_path, bad, said):
    result = run_tftrain(
        "launch",
        "--num_workers=2",
        "--",
        "--experiment=fashion_mnist_mlp:smoke",
        "--strategy=multi_worker_mirrored",
        bad,
        f"--model_dir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode == 2 and said in result.stderr
    assert result.stderr.count("tftrain: error:") == 1
    assert "started" not in result.stdout and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_one_device_mirrored_and_two_launched_workers_agree(tmp_path):
    """Same seed, data order and global batch: the same model after 60 steps."""
    runs = {}
    for name, flags in (
        ("one", ["--strategy=one_device"]),
        ("mirrored", ["--strategy=mirrored", "--num_replicas=2"]),
    ):
        runs[name] = str(tmp_path / name)
        run_tftrain("train", *SMOKE, *flags, f"--model_dir={runs[name]}")
    runs["mwms"] = str(tmp_path / "mwms")
    command = (
        "launch",
        "--num_workers=2",
        "--",
        *SMOKE,
        "--strategy=multi_worker_mirrored",
        f"--model_dir={runs['mwms']}",
        "--collective_timeout_secs=120",
    )
    result = run_tftrain(*command)
    # Both workers end with bit-identical weights ...
    prints = re.findall(r"\[worker:(\d)\] Final weights sha256 (\w+)", result.stdout)
    assert sorted(w for w, _ in prints) == ["0", "1"]
    assert prints[0][1] == prints[1][1]
    # Only the chief reports progress and evaluations: no line said twice.
    assert re.search(r"\[worker:0\] step \d+/", result.stdout)
    assert re.search(r"\[worker:0\] eval at step", result.stdout)
    assert not re.search(r"\[worker:1\] (step \d+/|eval at step|Training )", result.stdout)
    # ... and leave together: no worker is reported as crashed at the end.
    assert "have crashed" not in result.stdout + result.stderr
    # The same command again: the chief finds the run finished, both
    # workers take its word, and metrics.json stays byte for byte.
    with open(os.path.join(runs["mwms"], "metrics.json"), "rb") as f:
        record = f.read()
    again = run_tftrain(*command)
    assert "[worker:0] This run already finished at step 60 of 60" in again.stdout
    with open(os.path.join(runs["mwms"], "metrics.json"), "rb") as f:
        assert f.read() == record
    # TensorFlow's own gRPC ring in place of tftrain's TCP ring (the default
    # on CPUs) sums a+b too: the same bits.
    runs["mwms_grpc"] = str(tmp_path / "mwms_grpc")
    grpc = run_tftrain(
        "launch",
        "--num_workers=2",
        "--",
        *SMOKE,
        "--strategy=multi_worker_mirrored",
        "--collective=grpc",
        f"--model_dir={runs['mwms_grpc']}",
        "--collective_timeout_secs=120",
    )
    assert re.findall(r"Final weights sha256 (\w+)", grpc.stdout) == [prints[0][1]] * 2
    # ... and all the runs with the same eval loss, to float32 rounding of
    # gradient sums taken in another order.
    losses = {k: metrics(v)["eval_loss"] for k, v in runs.items()}
    assert losses["mirrored"] == pytest.approx(losses["one"], rel=1e-5)
    assert losses["mwms"] == pytest.approx(losses["one"], rel=1e-5)
    assert metrics(runs["mwms"])["num_replicas"] == 2
    assert metrics(runs["mwms"])["global_step"] == 60


def _launch(args, model_dir, extra=()):
    return start_tftrain(
        "launch",
        *args,
        "--",
        *SMOKE[:1],
        "--strategy=multi_worker_mirrored",
        f"--model_dir={model_dir}",
        "--collective_timeout_secs=60",
        "--train_steps=400",
        "--steps_per_loop=10",
        "--checkpoint_interval=20",
        "--eval_interval=1000",
        *extra,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
@pytest.mark.long  # tests/test_bucket.py kills a worker too, and checks the weights
def test_killed_worker_restarts_the_cluster_from_the_last_checkpoint(tmp_path):
    model_dir = str(tmp_path / "run")
    proc = _launch(["--num_workers=2", "--max_restarts=1"], model_dir)
    lines = []
    pid = int(_read_until(proc, r"started worker:1 \(pid (\d+)\)", lines).group(1))
    _read_until(proc, r"\[worker:0\] step (6\d|[7-9]\d|\d{3})/400", lines)
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert "restarting the cluster from the last checkpoint (1/1)" in text
    resumed = int(re.search(r"\[worker:0\] Resumed from .*ckpt-(\d+) at step", text).group(1))
    assert resumed >= 40  # lost at most the steps since the last checkpoint
    assert metrics(model_dir)["global_step"] == 400


@pytest.mark.slow
@pytest.mark.long  # a killed worker restarts the cluster: tests/test_nodes.py, test_bucket.py
def test_a_killed_pipeline_stage_restarts_the_cluster_from_the_last_checkpoint(tmp_path):
    model_dir = str(tmp_path / "run")
    pipeline = ["--strategy=model_parallel", "--log_interval_secs=0"]
    proc = _launch(["--num_workers=2", "--max_restarts=1"], model_dir, pipeline)
    lines = []
    pid = int(_read_until(proc, r"started worker:1 \(pid (\d+)\)", lines).group(1))
    _read_until(proc, r"\[worker:0\] step (6\d|[7-9]\d|\d{3})/400", lines)
    os.kill(pid, signal.SIGKILL)  # the task that holds stage 1
    out, _ = proc.communicate(timeout=300)
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert "worker:1 failed with exit code -9; restarting the cluster" in text
    resumed = int(re.search(r"\[worker:0\] Resumed from .*ckpt-(\d+) at step", text).group(1))
    assert resumed >= 40
    assert metrics(model_dir)["global_step"] == 400
    assert metrics(model_dir)["strategy"] == "model_parallel"


@pytest.mark.slow
def test_first_failure_stops_the_others_and_leaves_no_orphans(tmp_path):
    longer = ["--train_steps=3000", "--log_interval_secs=0"]
    proc = _launch(["--num_workers=2"], str(tmp_path / "run"), longer)
    lines = []
    pids = {}
    for _ in range(2):
        m = _read_until(proc, r"started (worker:\d) \(pid (\d+)\)", lines)
        pids[m.group(1)] = int(m.group(2))
    # Only the chief prints progress: once it trains, so does worker 1.
    _read_until(proc, r"\[worker:0\] step \d+/3000", lines)
    os.kill(pids["worker:1"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "worker:1 failed with exit code -9; stopped the other tasks" in out
    assert not _alive(pids["worker:0"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_ps, sig",
    [
        (0, signal.SIGKILL),
        pytest.param(1, signal.SIGKILL, marks=pytest.mark.long),
        (0, signal.SIGHUP),
    ],
    ids=["killed_all_reduce", "killed_parameter_server", "SIGHUP"],
)
def test_a_launcher_killed_or_hung_up_leaves_no_task_behind_and_the_step_is_saved(
    tmp_path, num_ps, sig
):
    # The tasks run in sessions of their own. Killed, the launcher can tell
    # them nothing: the kernel's word that their parent died
    # (PR_SET_PDEATHSIG) stops them, each as on SIGTERM. SIGHUP (a terminal
    # that closed) is answered as Ctrl-C is, with its own exit code.
    model_dir = str(tmp_path / "run")
    longer = ["--train_steps=3000", "--checkpoint_interval=1000", "--log_interval_secs=0"]
    if num_ps:
        longer.append("--strategy=parameter_server")
    proc = _launch(["--num_workers=2", f"--num_ps={num_ps}"], model_dir, longer)
    lines, pids = [], []
    for _ in range(2 + (num_ps + 1 if num_ps else 0)):
        pids.append(int(_read_until(proc, r"started \S+ \(pid (\d+)\)", lines).group(1)))
    _read_until(proc, r"\[(worker|chief):0\] step \d+/3000", lines)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    if sig == signal.SIGHUP:
        assert proc.returncode == 129 and "every task stopped" in out, out
    deadline = time.time() + 60 + 10  # --collective_timeout_secs + 10 s
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "".join(lines[-30:])
    names = os.listdir(os.path.join(model_dir, "checkpoints"))
    saved = {int(m.group(1)) for n in names if (m := re.fullmatch(r"ckpt-(\d+)\.index", n))}
    assert any(step % 1000 for step in saved), saved  # a step between the periodic ones


@pytest.mark.slow
@pytest.mark.long  # the launcher's SIGHUP test saves every task's step in a shorter run
def test_ctrl_c_saves_the_same_step_on_every_worker_and_the_run_resumes_exactly(tmp_path):
    model_dir = str(tmp_path / "run")
    longer = ["--train_steps=3000", "--checkpoint_interval=1000", "--log_interval_secs=0"]
    proc = _launch(["--num_workers=2"], model_dir, longer)
    lines, pids = [], []
    for _ in range(2):
        pids.append(int(_read_until(proc, r"started worker:\d \(pid (\d+)\)", lines).group(1)))
    _read_until(proc, r"\[worker:0\] step \d+/3000", lines)
    interrupted = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert time.time() - interrupted < 30
    assert proc.returncode == 130
    assert "every task stopped; run the same command to resume" in out, out
    assert not any(_alive(p) for p in pids)
    stopped = re.findall(r"\[worker:(\d)\] Stopped at step (\d+)/3000 on request", out)
    assert len(stopped) == 2 and stopped[0][1] == stopped[1][1], out
    step = int(stopped[0][1])
    assert 0 < step < 3000

    resumed = _launch(["--num_workers=2"], model_dir, longer)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"at step {step}." in out
    straight = _launch(["--num_workers=2"], str(tmp_path / "straight"), longer)
    straight.communicate(timeout=300)
    assert straight.returncode == 0
    got, want = metrics(model_dir), metrics(str(tmp_path / "straight"))
    assert got["global_step"] == 3000 and got["weights_sha256"] == want["weights_sha256"]


@pytest.mark.slow
def test_a_worker_that_never_comes_is_a_failure_not_a_hang(tmp_path):
    tf_config = json.dumps(
        {
            "cluster": launch.free_cluster_spec(2),
            "task": {"type": "worker", "index": 0},
        }
    )
    start = time.time()
    result = run_tftrain(
        "train",
        *SMOKE,
        "--strategy=multi_worker_mirrored",
        f"--model_dir={tmp_path / 'r'}",
        "--collective_timeout_secs=10",
        env={"TF_CONFIG": tf_config},
        check=False,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no progress for" in result.stderr, result.stderr
    worker_1 = json.loads(tf_config)["cluster"]["worker"][1]
    assert f"nothing answers at worker:1 at {worker_1}: died or never started" in result.stderr
    assert time.time() - start < 60


def _watch(pid: int, *peers: str) -> str:
    """What the watchdog's watcher says when ``pid`` makes no progress for 1 s."""
    from tftrain.distribute import watchdog

    watcher = subprocess.Popen(
        [sys.executable, "-c", watchdog._WATCHER, str(pid), "1", *peers],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # stdin stays open and silent (its end would be the run's end).
    watcher.wait(timeout=30)
    said = watcher.stderr.read()
    watcher.stdin.close()
    assert watcher.returncode == 1, said
    return said


@pytest.mark.parametrize("frozen", [True, False], ids=["this_task_stopped", "a_peer_gone"])
def test_the_watchdog_kills_then_blames_the_task_that_hung(frozen):
    # A task stopped by SIGSTOP (Ctrl-Z, a debugger) is named as itself, not
    # as "another task"; otherwise the peers whose ports refuse are named.
    task = subprocess.Popen(["sleep", "60"])
    try:
        if frozen:
            os.kill(task.pid, signal.SIGSTOP)
        gone = f"127.0.0.1:{free_port()}"
        said = _watch(task.pid, f"worker:1={gone}")
        assert task.wait(timeout=10) == -signal.SIGKILL  # killed first
    finally:
        task.kill()
        task.wait()
    assert said.count("\n") == 1 and said.startswith("tftrain: error: no progress for "), said
    if frozen:
        assert "this task was stopped (SIGSTOP, Ctrl-Z or a debugger)" in said, said
        assert "worker:1" not in said
    else:
        assert f"nothing answers at worker:1 at {gone}: died or never started" in said, said


def test_collectives_do_not_leak_threads():
    """TensorFlow 2.21 leaks two threads per all-reduce when a collective
    timeout is set; a long run then dies when it can start no more threads."""
    spec = launch.free_cluster_spec(2)
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "collective_worker.py")],
            env=launch.task_env(spec, "worker", i),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    counts = json.loads(outs[0].strip().splitlines()[-1])
    assert counts["after"] - counts["before"] < 20, counts


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and 2 cores",
)
def test_each_task_gets_its_own_cores_when_there_are_enough():
    cluster = launch.Cluster(num_workers=2, num_ps=0, train_argv=[])
    cores = sorted(os.sched_getaffinity(0))
    sleepers = []
    try:
        for position in range(2):
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            sleepers.append(proc)
            cluster._pin(type("Task", (), {"process": proc})(), position)
        per_task = len(cores) // 2
        assert [os.sched_getaffinity(p.pid) for p in sleepers] == [
            set(cores[:per_task]),
            set(cores[per_task : 2 * per_task]),
        ]
        # Too many tasks for the cores: nobody is pinned.
        crowded = launch.Cluster(num_workers=len(cores) + 1, num_ps=0, train_argv=[])
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        sleepers.append(proc)
        crowded._pin(type("Task", (), {"process": proc})(), 0)
        assert os.sched_getaffinity(proc.pid) == set(cores)
        crowded._release_ports()
    finally:
        cluster._release_ports()
        for proc in sleepers:
            proc.kill()
            proc.wait()


def test_the_dockerfile_builds_the_image_the_manifest_names_with_its_ports():
    from absl import flags

    from tftrain.distribute import tfjob

    text = open(os.path.join(ROOT, "Dockerfile")).read()
    values = flags.FlagValues()
    launch.define_flags(values)
    assert f"docker build -t {values['image'].default} ." in text
    assert "pip install" in text and "dataset-fashion-mnist" in text
    exposed = re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()
    assert sorted(exposed) == sorted([str(tfjob.GRPC_PORT), str(tfjob.RING_PORT)])
    # The pods' securityContext runs as the image's own unprivileged user,
    # and the GPU build argument the launcher names exists.
    assert f"USER {tfjob.IMAGE_UID}:{tfjob.IMAGE_UID}" in text
    assert f"--uid {tfjob.IMAGE_UID}" in text
    assert "ARG EXTRAS" in text and "--build-arg EXTRAS=gpu" in text
    assert "-c constraints.txt" in text
    copied = re.findall(r"^COPY (.*) \./$", text, re.M)[0].split()
    assert all(os.path.exists(os.path.join(ROOT, name)) for name in copied)


def test_more_tasks_than_the_memory_holds_are_refused_before_any_starts(tmp_path):
    from tftrain.distribute import launch

    floor = launch.TASK_MEMORY_FLOOR
    assert launch.check_memory(4, 4 * floor) is None
    assert launch.check_memory(4, None) is None  # unknown: not refused
    said = launch.check_memory(5, 4 * floor)
    assert said.startswith("5 tasks need at least 2.5 GiB (512 MiB each")
    assert "--nocheck_memory" in said
    # More tasks than any machine's memory holds: one line, nothing started.
    result = run_tftrain(
        "launch",
        "--num_workers=4096",
        "--",
        *SMOKE[:1],
        "--strategy=multi_worker_mirrored",
        "--batch_size=4096",
        f"--model_dir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode == 2 and "4096 tasks need at least 2048.0 GiB" in result.stderr
    assert "started" not in result.stdout and not (tmp_path / "run").exists()

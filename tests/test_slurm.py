"""Slurm: ``srun tftrain train`` takes each task's role from Slurm's
environment (tftrain/distribute/slurm.py), checked against Slurm's own
variables and on a real one-machine Slurm cluster (slurmctld, slurmd and
munge, started here)."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import PAIR_FLAGS, ROOT
from tests.conftest import free_port as _free_port
from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute import cluster as cluster_lib
from tftrain.distribute import slurm


def _step(monkeypatch, rank, nodes="node[01-02]", tasks_per_node="2(x2)", tasks=4, job="77"):
    """Slurm's variables in task ``rank`` of an srun step, as Slurm sets them."""
    for name, value in {
        "SLURM_PROCID": rank,
        "SLURM_STEP_NUM_TASKS": tasks,
        "SLURM_STEP_NODELIST": nodes,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_JOB_ID": job,
    }.items():
        monkeypatch.setenv(name, str(value))
    # Set, then removed: monkeypatch then removes what the resolution sets
    # (from_environment writes TF_CONFIG), so that no later test sees it.
    monkeypatch.setenv("TF_CONFIG", "")
    monkeypatch.delenv("TF_CONFIG")


def test_a_parameter_server_step_over_two_nodes(monkeypatch):
    config = ExperimentConfig(strategy="parameter_server", slurm_ps=1, slurm_port_base=31000)
    seen = {}
    for rank in range(4):
        _step(monkeypatch, rank)
        document = json.loads(slurm.tf_config(config))
        seen[rank] = (document["task"]["type"], document["task"]["index"])
    assert document["cluster"] == {
        "chief": ["node01:31000"],
        "ps": ["node01:31001"],
        "worker": ["node02:31000", "node02:31001"],
    }
    assert seen == {0: ("chief", 0), 1: ("ps", 0), 2: ("worker", 0), 3: ("worker", 1)}


def test_all_reduce_workers_and_the_cluster_tensorflow_sees(monkeypatch):
    config = ExperimentConfig(strategy="multi_worker_mirrored")
    _step(monkeypatch, 1, nodes="vm", tasks_per_node="2", tasks=2, job="4")
    info = cluster_lib.from_environment(config)
    base = slurm.port_base(config)
    assert info.cluster == {"worker": (f"vm:{base}", f"vm:{base + 1}")}
    assert (info.task_type, info.task_index) == ("worker", 1)
    assert json.loads(os.environ["TF_CONFIG"])["task"] == {"type": "worker", "index": 1}
    # The port base follows the job, so that two jobs on a node rarely meet.
    assert 20000 <= base < 60000
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    assert slurm.port_base(config) == base + slurm.PORTS_PER_JOB


def test_what_a_slurm_step_cannot_run_is_one_line(monkeypatch):
    _step(monkeypatch, 0)
    for config, said in [
        (ExperimentConfig(strategy="one_device"), "runs in one process"),
        (ExperimentConfig(strategy="parameter_server"), "--slurm_ps=0"),
        (ExperimentConfig(strategy="parameter_server", slurm_ps=3), "at least one parameter"),
        (ExperimentConfig(strategy="multi_worker_mirrored", slurm_ps=1), "parameter servers"),
    ]:
        with pytest.raises(ConfigError, match=said):
            slurm.tf_config(config)
    # One task (an sbatch script itself, srun --ntasks=1): no cluster.
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert not slurm.in_step()
    assert cluster_lib.from_environment(ExperimentConfig()) is None


# -- a real Slurm cluster ------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster():
    """slurmctld, slurmd and munged of a one-node cluster in a folder of
    their own (its own config, state, ports and munge socket)."""
    missing = [
        d for d in ("slurmctld", "slurmd", "srun", "sbatch", "munged") if not shutil.which(d)
    ]
    if missing:
        pytest.fail(
            f"the Slurm tests need {', '.join(missing)}: scripts/setup.sh installs Debian's "
            "slurmctld, slurmd, slurm-client and munge"
        )
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    # munged wants every folder above its socket open to all: not pytest's.
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tftrain-slurm-", dir="/tmp"))
    os.chmod(folder, 0o755)
    for sub in ("spool", "state", "log", "munge"):
        (folder / sub).mkdir()
    os.chmod(folder / "munge", 0o755)  # munged wants its socket's folder open to all
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge = folder / "munge"
    subprocess.run(
        ["munged", f"--socket={munge}/munge.sock", f"--key-file={key}",
         f"--log-file={munge}/munged.log", f"--pid-file={munge}/munged.pid",
         f"--seed-file={munge}/munged.seed"],
        check=True, timeout=30,
    )  # fmt: skip
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(
        f"""ClusterName=tftrain
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge}/munge.sock
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmdSpoolDir={folder}/spool
StateSaveLocation={folder}/state
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
NodeName={host} CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons = [
        subprocess.Popen(
            [daemon, "-D", *extra],
            env=env,
            stdout=open(folder / "log" / f"{daemon}.out", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for daemon, extra in (("slurmctld", ["-i"]), ("slurmd", []))
    ]
    try:
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30
            ).stdout.strip()
            if state == "idle":
                break
            if time.monotonic() > deadline:
                logs = "".join(p.read_text()[-2000:] for p in (folder / "log").iterdir())
                pytest.fail(f"Slurm did not come up (node {state!r}):\n{logs}")
            time.sleep(0.5)
        yield {"SLURM_CONF": str(conf)}
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        for process in daemons:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pid = (munge / "munged.pid").read_text().strip() if (munge / "munged.pid").exists() else ""
        if pid.isdigit():
            try:
                os.kill(int(pid), 15)
            except ProcessLookupError:
                pass
        shutil.rmtree(folder, ignore_errors=True)


SMOKE = PAIR_FLAGS[:-1]


@pytest.mark.slow
@pytest.mark.cluster
def test_an_sbatch_job_of_two_tasks_trains_as_two_launched_workers(
    slurm_cluster, tmp_path, two_launched_workers
):
    job_dir = str(tmp_path / "slurm")
    env = dict(os.environ, **slurm_cluster, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    # The tftrain command of this Python (a virtual environment's bin).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    result = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
         f"--output={tmp_path}/job-%j.out", os.path.join(ROOT, "scripts", "tftrain.sbatch"),
         *SMOKE, "--strategy=multi_worker_mirrored", f"--model_dir={job_dir}"],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert result.returncode == 0, result.stdout + result.stderr + output
    assert "2 replica(s) on 2 worker(s)" in output
    with open(os.path.join(job_dir, "metrics.json")) as f:
        got = json.load(f)
    assert got["weights_sha256"] == two_launched_workers["weights_sha256"]
    assert got["num_workers"] == 2

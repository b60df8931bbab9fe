"""``tftrain launch --nnodes=N``: one cluster over several machines, here
several launchers on loopback, agreeing through node 0's rendezvous
(tftrain/distribute/rendezvous.py)."""

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import PAIR_FLAGS, run_tftrain, start_tftrain
from tests.conftest import free_port as _free_port
from tests.conftest import read_until as _read_until
from tftrain.config import ConfigError
from tftrain.distribute import rendezvous

SMOKE = PAIR_FLAGS[:-1]


def test_the_rendezvous_forms_each_round_and_passes_events_on():
    port = _free_port()
    server = rendezvous.Server("127.0.0.1", port, nnodes=2, timeout=10)
    nodes = [rendezvous.Node(("127.0.0.1", port), rank, 10, key="k") for rank in (0, 1)]
    try:
        specs = {}
        joins = [
            threading.Thread(
                target=lambda r: specs.__setitem__(r, nodes[r].join(0, [f"h{r}:1", f"h{r}:2"])),
                args=(r,),
            )
            for r in (1, 0)  # in any order: the cluster is in node order
        ]
        for t in joins:
            t.start()
        for t in joins:
            t.join(20)
        assert specs[0] == specs[1] == {"worker": ["h0:1", "h0:2", "h1:1", "h1:2"]}
        # An event reaches the other nodes, for the round it names only.
        nodes[0].tell(rendezvous.FAILED, 0, node_rank=0, task="worker:1")
        nodes[0].tell(rendezvous.FAILED, 7, node_rank=0, task="worker:1")
        deadline = time.monotonic() + 10
        got = None
        while got is None and time.monotonic() < deadline:
            got = nodes[1].poll(0)
        assert got == {"event": "failed", "round": 0, "node_rank": 0, "task": "worker:1"}
        time.sleep(0.3)
        assert nodes[1].poll(0) is None  # round 7's was dropped
        assert nodes[0].poll(0) is None  # not sent back to its sender

        # A node with other flags, or a rank twice, is refused in one line.
        def wait_in_round_one():
            try:
                nodes[0].join(1, ["h0:3"])
            except (ConfigError, OSError):  # nobody else comes, or the test ends
                pass

        threading.Thread(target=wait_in_round_one, daemon=True).start()
        time.sleep(0.5)
        other = rendezvous.Node(("127.0.0.1", port), 1, 5, key="other", flags=["--seed=4"])
        with pytest.raises(ConfigError, match=r"node 1's flags differ from node 0's \(--seed=4\)"):
            other.join(1, ["h1:3"])
        with pytest.raises(ConfigError, match="node_rank 0 joined twice"):
            rendezvous.Node(("127.0.0.1", port), 0, 5, key="k").join(1, ["h0:4"])
    finally:
        for node in nodes:
            node.close()
        server.close()
    # Nobody at the coordinator: a bounded wait, then one line.
    with pytest.raises(ConfigError, match="cannot reach the coordinator"):
        rendezvous.Node(("127.0.0.1", _free_port()), 1, 1.0, key="k").join(0, ["h:1"])


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--nnodes=2"], "--nnodes=2 needs --coordinator=HOST:PORT"),
        (["--nnodes=2", "--coordinator=127.0.0.1:1", "--node_rank=2"], "expected 0 to 1"),
        (["--nnodes=2", "--coordinator=127.0.0.1:1", "--num_ps=1"], "run on one machine"),
        (["--nnodes=2", "--coordinator=nowhere"], "expected HOST:PORT"),
    ],
)
def test_what_a_cluster_of_nodes_cannot_be_is_one_line(flags, said, tmp_path):
    result = run_tftrain(
        "launch",
        "--num_workers=1",
        *flags,
        "--",
        *SMOKE,
        "--strategy=multi_worker_mirrored",
        f"--model_dir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


def _nodes(port, model_dir, extra_train=(), extra_launch=()):
    return [
        start_tftrain(
            "launch",
            "--nnodes=2",
            f"--node_rank={rank}",
            f"--coordinator=127.0.0.1:{port}",
            "--num_workers=1",
            "--rendezvous_timeout_secs=120",
            *extra_launch,
            "--",
            *SMOKE,
            "--strategy=multi_worker_mirrored",
            f"--model_dir={model_dir}",
            "--collective_timeout_secs=60",
            *extra_train,
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]


def _finish(procs, timeout=600):
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outs


@pytest.mark.slow
@pytest.mark.cluster
def test_two_launchers_train_as_one_cluster_and_restart_together(tmp_path, two_launched_workers):
    """Two 1-worker launchers are one 2-worker cluster: node 1's worker,
    killed, restarts the whole cluster from the last checkpoint on both
    nodes, to the weights of an uninterrupted tftrain launch --num_workers=2."""
    model_dir = str(tmp_path / "run")
    procs = _nodes(_free_port(), model_dir, extra_launch=["--max_restarts=1"])
    lines = []
    pid = int(_read_until(procs[1], r"started worker:1 \(pid (\d+)\)", lines).group(1))
    checkpoint = os.path.join(model_dir, "checkpoints", "ckpt-20.index")
    deadline = time.time() + 240
    while not os.path.exists(checkpoint) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    outs = _finish(procs)
    outs[1] = "".join(lines) + outs[1]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out in outs:
        assert "restarting the cluster from the last checkpoint (1/1)" in out, out
    assert re.search(r"\[worker:0\] Resumed from .*ckpt-\d+ at step", outs[0]), outs[0]
    cluster = json.loads(re.search(r"\[launch\] cluster (\{.*\});", outs[0]).group(1))
    assert len(cluster["worker"]) == 2
    with open(os.path.join(model_dir, "metrics.json")) as f:
        got = json.load(f)
    assert got["weights_sha256"] == two_launched_workers["weights_sha256"]
    assert got["num_workers"] == 2


@pytest.mark.slow
@pytest.mark.cluster
def test_ctrl_c_on_one_node_stops_every_node_at_the_same_step(tmp_path):
    model_dir = str(tmp_path / "run")
    longer = ["--train_steps=3000", "--checkpoint_interval=1000", "--log_interval_secs=0"]
    procs = _nodes(_free_port(), model_dir, extra_train=longer)
    lines = []
    _read_until(procs[0], r"\[worker:0\] step \d+/3000", lines)
    procs[1].send_signal(signal.SIGINT)
    outs = _finish(procs, timeout=120)
    outs[0] = "".join(lines) + outs[0]
    assert [p.returncode for p in procs] == [130, 130], outs
    assert "another node was interrupted" in outs[0], outs[0]
    stopped = re.findall(r"\[worker:(\d)\] Stopped at step (\d+)/3000 on request", "".join(outs))
    assert sorted(w for w, _ in stopped) == ["0", "1"] and stopped[0][1] == stopped[1][1], outs
    step = int(stopped[0][1])
    assert os.path.exists(os.path.join(model_dir, "checkpoints", f"ckpt-{step}.index"))

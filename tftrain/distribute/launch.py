"""``tftrain launch``: a local cluster, one process per task, like torchrun.

Each task gets its own ``TF_CONFIG`` over free loopback ports, a share of
the machine's cores, and its output prefixed with its name. The first task
to fail stops the rest (non-zero exit) unless ``--max_restarts`` allows a
restart, which resumes from the last checkpoint in ``--model_dir``. A
worker of a parameter-server run is restarted on its own: the coordinator
tolerates its loss. Ctrl-C and SIGTERM stop every task; no process is left
behind.

``--emit=tfjob`` prints a Kubeflow TFJob manifest for the same run instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from tftrain import lifeline, resources

# The least memory one task of a local cluster takes: a Python process with
# TensorFlow and one strategy (BUILD_NOTES.md: a worker of the MLP on
# Fashion-MNIST peaked at 0.87 GB). A model's own bytes come on top.
TASK_MEMORY_FLOOR = 512 << 20


def check_memory(tasks: int, available: int | None) -> str | None:
    """Why ``tasks`` local tasks would not fit in ``available`` bytes, or None."""
    need = tasks * TASK_MEMORY_FLOOR
    if available is None or need <= available:
        return None
    return (
        f"{tasks} tasks need at least {need / 2**30:.1f} GiB ({TASK_MEMORY_FLOOR >> 20} MiB "
        f"each, before the model's own bytes), but this machine has {available / 2**30:.1f} "
        "GiB available: start fewer tasks (--num_workers, --num_ps), or pass "
        "--nocheck_memory to start them anyway."
    )


def define_flags(flag_values) -> None:
    from absl import flags

    from tftrain.distribute import tfjob

    flags.DEFINE_integer("num_workers", 2, "worker tasks", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer(
        "num_ps",
        0,
        "parameter-server tasks; with them a chief (the coordinator) is started too",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "evaluator",
        False,
        "start an evaluator task too: it evaluates each new checkpoint beside the "
        "training tasks (parameter servers only)",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "max_restarts",
        0,
        "restarts of the whole cluster after a task fails; each resumes from the last checkpoint",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "stop_grace_secs",
        30.0,
        "seconds a task gets to save a checkpoint and stop after SIGTERM, before SIGKILL",
        lower_bound=0.0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "threads_per_task",
        0,
        "intra-op threads per task (0: the machine's cores shared out among the tasks)",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "nnodes",
        1,
        "machines the cluster spans; each runs tftrain launch with its own --node_rank and "
        "--num_workers workers (multi_worker_mirrored, model_parallel)",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "node_rank",
        0,
        "this machine's place among the --nnodes (0: the one that serves --coordinator)",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "coordinator",
        "",
        "HOST:PORT where node 0's launcher meets the others (with --nnodes)",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "node_host",
        "",
        "the address the other nodes reach this machine at (default: the one that "
        "reaches --coordinator)",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "rendezvous_timeout_secs",
        300.0,
        "how long the nodes wait for each other, at the start and at each restart",
        lower_bound=1.0,
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "check_memory",
        True,
        "refuse to start more tasks than this machine's available memory holds "
        f"(each task counted at {TASK_MEMORY_FLOOR >> 20} MiB at least)",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "emit",
        "",
        ["", "tfjob"],
        "print a manifest instead of running: tfjob (Kubeflow)",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "image", "tftrain:latest", "container image, for --emit", flag_values=flag_values
    )
    flags.DEFINE_string("job_name", "tftrain", "job name, for --emit", flag_values=flag_values)
    flags.DEFINE_string(
        "task_cpu",
        tfjob.DEFAULT_CPU,
        "CPU each task requests, for --emit (a Kubernetes quantity)",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "task_memory",
        tfjob.DEFAULT_MEMORY,
        "memory each task requests and is limited to, for --emit",
        flag_values=flag_values,
    )
    flags.DEFINE_multi_string(
        "volume",
        [],
        "NAME:CLAIM:MOUNT, for --emit: a PersistentVolumeClaim every pod mounts at MOUNT "
        "(repeat for more); a local --model_dir must be on one",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "task_gpus",
        0,
        "GPUs each worker (and chief) asks for, for --emit; the image needs CUDA "
        "(docker build --build-arg EXTRAS=gpu)",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "backoff_limit",
        tfjob.DEFAULT_BACKOFF_LIMIT,
        "for --emit: restarts of failed pods (a lost task, a preemption) before the job fails",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "ttl_secs",
        tfjob.DEFAULT_TTL_SECS,
        "for --emit: seconds a finished job's pods are kept (their logs) before deletion",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "clean_pod_policy",
        "Running",
        list(tfjob.CLEAN_POD_POLICIES),
        "for --emit: which pods to delete when the job ends (Running: the parameter "
        "servers still serving)",
        flag_values=flag_values,
    )


# -- the cluster ------------------------------------------------------------


def reserve_ports(count: int, host: str = "127.0.0.1") -> tuple[list[int], list[socket.socket]]:
    """Picks ``count`` distinct free ports and keeps them bound until released.

    Holding them all at once keeps them distinct and keeps other programs
    off them while the cluster is planned. TensorFlow's gRPC server will not
    share a port, so the caller closes the sockets just before it starts the
    tasks; the window left is the time a process takes to start.
    """
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((host, 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    return ports, sockets


def cluster_spec(
    num_workers: int,
    num_ps: int,
    ports: Sequence[int],
    host: str = "127.0.0.1",
    evaluator: bool = False,
) -> dict[str, list[str]]:
    """The cluster: a chief only when there are parameter servers."""
    addresses = iter(f"{host}:{p}" for p in ports)
    spec: dict[str, list[str]] = {}
    if num_ps:
        spec["chief"] = [next(addresses)]
    spec["worker"] = [next(addresses) for _ in range(num_workers)]
    if num_ps:
        spec["ps"] = [next(addresses) for _ in range(num_ps)]
    if evaluator:
        spec["evaluator"] = [next(addresses)]
    return spec


def free_cluster_spec(num_workers: int, num_ps: int = 0) -> dict[str, list[str]]:
    """A cluster on free loopback ports, released at once: for a caller that
    starts its own task processes straight away."""
    ports, sockets = reserve_ports(num_workers + num_ps + (1 if num_ps else 0))
    for s in sockets:
        s.close()
    return cluster_spec(num_workers, num_ps, ports)


def tasks_of(spec: dict[str, list[str]]) -> list[tuple[str, int]]:
    return [
        (t, i) for t in ("chief", "worker", "ps", "evaluator") for i in range(len(spec.get(t, ())))
    ]


def task_env(spec, task_type: str, index: int) -> dict:
    """The task's environment: its TF_CONFIG, and gRPC's fail-fast setting,
    without which a parameter-server coordinator cannot tell that a worker died."""
    env = dict(os.environ)
    env["TF_CONFIG"] = json.dumps({"cluster": spec, "task": {"type": task_type, "index": index}})
    env["GRPC_FAIL_FAST"] = "use_caller"
    env["PYTHONUNBUFFERED"] = "1"
    env[lifeline.LAUNCHER_PID] = str(os.getpid())  # the task stops when this process dies
    return env


def task_flags(threads: int, num_workers: int) -> list[str]:
    """Thread flags for a task that shares this machine's cores with the
    others; put before the user's flags, which win."""
    return [
        f"--intra_op_threads={threads}",
        f"--inter_op_threads={resources.cluster_inter_op_threads(num_workers)}",
        # A pool thread spinning for work in one task takes CPU its peers need.
        "--nothread_spinning",
    ]


class _Task:
    def __init__(self, name: str, argv: list[str], env: dict, lock: threading.Lock):
        self.name = name
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._forward, args=(lock,), daemon=True)
        self._pump.start()

    def _forward(self, lock: threading.Lock) -> None:
        # Reads to the end even when the console is gone: a task whose output
        # nobody reads would block on a full pipe.
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with lock:
                lifeline.say(f"[{self.name}] {line}")
        self.process.stdout.close()

    def signal(self, sig: int) -> None:
        lifeline.signal_group(self.process, sig)  # the task and anything it started

    def drain(self, timeout: float = 5.0) -> None:
        self._pump.join(timeout)


class Cluster:
    """Starts, watches and stops the tasks of one local cluster."""

    def __init__(
        self,
        *,
        num_workers: int,
        num_ps: int,
        train_argv: list[str],
        threads_per_task: int = 0,
        stop_grace_secs: float = 30.0,
        evaluator: bool = False,
        reserve_host: str = "127.0.0.1",
    ):
        self.num_workers = num_workers
        self.num_ps = num_ps
        self.train_argv = train_argv
        self.stop_grace_secs = stop_grace_secs
        tasks = num_workers + num_ps + (1 if num_ps else 0) + (1 if evaluator else 0)
        self.threads = threads_per_task or max(
            1, resources.usable_cores() // max(num_workers + (1 if num_ps else 0), 1)
        )
        self._lock = threading.Lock()
        self._ports, self._sockets = reserve_ports(tasks, host=reserve_host)
        self.spec = cluster_spec(num_workers, num_ps, self._ports, evaluator=evaluator)
        # The tasks this launcher runs: all of them, or this node's share.
        self.local = tasks_of(self.spec)
        self.total_workers = num_workers
        self.tasks: dict[tuple[str, int], _Task] = {}

    def span(self, spec: dict[str, list[str]], first_worker: int) -> None:
        """Makes this launcher's tasks workers ``first_worker``.. of the
        cluster ``spec`` that several machines share (their ports are the
        ones this launcher reserved)."""
        count = len(self.local)
        self.spec = spec
        self.local = [("worker", first_worker + i) for i in range(count)]
        self.total_workers = len(spec["worker"])

    def start_task(self, task_type: str, index: int) -> None:
        env = task_env(self.spec, task_type, index)
        argv = [
            sys.executable,
            "-m",
            "tftrain",
            "train",
            *task_flags(self.threads, self.total_workers),
            *self.train_argv,
        ]
        task = _Task(f"{task_type}:{index}", argv, env, self._lock)
        self.tasks[(task_type, index)] = task
        self._pin(task, self.local.index((task_type, index)))
        self._say(f"started {task.name} (pid {task.process.pid})")

    def _pin(self, task: _Task, position: int) -> None:
        """Gives each task its own cores when there are enough to go round.

        Unpinned, the tasks' threads migrate between cores and interrupt each
        other; pinned, each worker's step runs undisturbed (BUILD_NOTES.md).
        """
        mine = resources.core_share(position, len(self.local))
        if mine:
            resources.pin(task.process.pid, mine)

    def start(self) -> None:
        self._release_ports()
        for task_type, index in self.local:
            self.start_task(task_type, index)

    def stop(self) -> None:
        """SIGTERM to every live task, SIGKILL after the grace period."""
        lifeline.stop_groups([t.process for t in self.tasks.values()], self.stop_grace_secs)
        for task in self.tasks.values():
            task.drain()
        self._release_ports()

    def _release_ports(self) -> None:
        for s in self._sockets:
            s.close()
        self._sockets = []

    def watch(self, poll_secs: float = 0.2, elsewhere=None) -> tuple[int, str | None]:
        """Waits until the run ends (``elsewhere``: a callable that returns
        ``(exit code, what failed)`` when another node's launcher says its
        part failed, else None).

        Returns:
          ``(exit code, name of the failed task or None)``.
        """
        coordinator = ("chief", 0) if self.num_ps else None
        while True:
            failed_elsewhere = elsewhere() if elsewhere else None
            if failed_elsewhere:
                return failed_elsewhere
            for key, task in list(self.tasks.items()):
                code = task.process.poll()
                if code is None or code == 0:
                    continue
                # Exit 2 is a usage error: no restart can mend it.
                if self.num_ps and key[0] == "worker" and code != 2:
                    self._say(
                        f"{task.name} exited with {code}; restarting it (the "
                        "coordinator tolerates a lost worker)."
                    )
                    task.drain()
                    self.start_task(*key)
                    continue
                return code, task.name
            codes = {k: t.process.poll() for k, t in self.tasks.items()}
            if coordinator is not None:
                if codes[coordinator] == 0:
                    return 0, None
            elif all(c == 0 for c in codes.values()):
                return 0, None
            time.sleep(poll_secs)

    def _say(self, message: str) -> None:
        with self._lock:
            lifeline.say(f"[launch] {message}")


def run(
    *,
    num_workers: int,
    num_ps: int,
    train_argv: list[str],
    max_restarts: int = 0,
    threads_per_task: int = 0,
    stop_grace_secs: float = 30.0,
    evaluator: bool = False,
    span=None,
) -> int:
    """Runs the cluster to the end, restarting it up to ``max_restarts`` times.

    ``span``: this machine's part of a cluster over several
    (:class:`Span`): the launchers agree on each attempt's cluster, restart
    together and stop together.
    """
    from tftrain.config import ConfigError
    from tftrain.distribute import rendezvous
    from tftrain.errors import EXIT_RETRY

    attempt = 0
    stopping = {"signal": None, "remote": False}

    def elsewhere():
        event = span.node.poll(attempt)
        if event is None:
            return None
        if event["event"] == rendezvous.STOP:
            stopping["signal"], stopping["remote"] = event.get("signal") or signal.SIGTERM, True
            raise KeyboardInterrupt
        return EXIT_RETRY, f"node {event.get('node_rank')}'s {event.get('task', 'task')}"

    def on_signal(signum, _frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        while True:
            cluster = Cluster(
                num_workers=num_workers,
                num_ps=num_ps,
                train_argv=train_argv,
                threads_per_task=threads_per_task,
                stop_grace_secs=stop_grace_secs,
                evaluator=evaluator,
                reserve_host="0.0.0.0" if span else "127.0.0.1",
            )
            if span:
                addresses = [f"{span.host}:{port}" for port in cluster._ports]
                try:
                    spec = span.node.join(attempt, addresses)
                except ConfigError as e:
                    cluster._release_ports()
                    cluster._say(f"error: {e}")
                    return EXIT_RETRY if attempt else 2
                cluster.span(spec, span.node_rank * num_workers)
            cluster._say(
                f"cluster {json.dumps(cluster.spec)}; "
                f"{cluster.threads} intra-op thread(s) per task"
                + (f"; attempt {attempt + 1}" if attempt else "")
            )
            if not attempt:
                ports = ", ".join(str(p) for p in cluster._ports)
                cluster._say(
                    f"note: TensorFlow's gRPC servers listen on ports {ports} of every network "
                    "interface, not only 127.0.0.1, and have no authentication: keep these "
                    "ports behind a firewall (README.md, Security)."
                )
            try:
                cluster.start()
                code, failed = cluster.watch(elsewhere=elsewhere if span else None)
            except KeyboardInterrupt:
                if span and not stopping["remote"]:
                    span.node.tell(
                        rendezvous.STOP,
                        attempt,
                        signal=stopping["signal"] or signal.SIGINT,
                        node_rank=span.node_rank,
                    )
                cluster._say(
                    ("another node was interrupted" if stopping["remote"] else "interrupted")
                    + ": asking every task to save a checkpoint and stop "
                    f"(SIGTERM; SIGKILL after {cluster.stop_grace_secs:g} s)."
                )
                cluster.stop()
                killed = [t.name for t in cluster.tasks.values() if t.process.returncode == -9]
                cluster._say(
                    f"{', '.join(killed)} did not stop in time and were killed."
                    if killed
                    else "every task stopped; run the same command to resume."
                )
                return 128 + (stopping["signal"] or signal.SIGINT)
            if span and failed is not None and not failed.startswith("node "):
                if code in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP):
                    # A task that saved and stopped: another node was most
                    # likely interrupted, and its word is on the way.
                    deadline = time.monotonic() + 5.0
                    while time.monotonic() < deadline and not stopping["remote"]:
                        try:
                            elsewhere()
                        except KeyboardInterrupt:
                            break
                        time.sleep(0.1)
                    if stopping["remote"]:
                        cluster._say("another node was interrupted: every task stops.")
                        cluster.stop()
                        return 128 + stopping["signal"]
                span.node.tell(rendezvous.FAILED, attempt, node_rank=span.node_rank, task=failed)
            cluster.stop()
            if failed is None:
                cluster._say("every task finished.")
                return 0
            if attempt < max_restarts:
                attempt += 1
                cluster._say(
                    f"{failed} failed with exit code {code}; restarting the "
                    f"cluster from the last checkpoint ({attempt}/{max_restarts})."
                )
                continue
            cluster._say(f"{failed} failed with exit code {code}; stopped the other tasks.")
            return code if code > 0 else 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if span:
            span.node.close()


class Span:
    """This machine's place in a cluster over ``--nnodes`` machines."""

    def __init__(self, node, node_rank: int, host: str):
        self.node, self.node_rank, self.host = node, node_rank, host


def config_of_train_argv(train_argv: list[str]):
    """The config that ``tftrain train`` would make of ``train_argv``.

    Raises:
      ConfigError: a flag that is unknown or does not parse.
    """
    from absl import flags

    from tftrain import flagset
    from tftrain.config import ConfigError

    values = flags.FlagValues()
    flagset.define_train_flags(values)
    loaded = None
    named = flagset.experiment_in(train_argv)
    if named:  # its options are flags too
        from tftrain import registry

        loaded = registry.get(named)
        flagset.define_option_flags(loaded, values, key_flags=False)
    try:
        rest = values(["tftrain train", *train_argv], known_only=True)[1:]
    except flags.Error as e:
        raise ConfigError(f"{e} (tftrain train --help lists the flags).") from None
    for arg in rest:  # absl's own flags (--verbosity, ...) are a task's too
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-") or (
            name not in flags.FLAGS and name.removeprefix("no") not in flags.FLAGS
        ):
            raise ConfigError(
                f"unknown training flag or argument {arg!r} (tftrain train --help lists them)."
            )
    return flagset.config_from_flags(values, loaded)


def check_train_argv(train_argv: list[str], spec: dict[str, list[str]]):
    """The training flags checked as every task of ``spec`` will check them,
    before any task starts; returns the config.

    Raises:
      ConfigError: the first thing a task would refuse.
    """
    from tftrain.distribute import base
    from tftrain.distribute import cluster as cluster_lib

    config = config_of_train_argv(train_argv)
    for task_type, index in tasks_of(spec):
        document = {"cluster": spec, "task": {"type": task_type, "index": index}}
        cluster = cluster_lib.parse_tf_config(json.dumps(document))
        if task_type == "evaluator" or cluster.task_type in ("ps",):
            continue  # they run what the training tasks checked
        base.mode_for(config.replace(restart=False), cluster)
    return config


def with_absolute_experiment(train_argv: list[str]) -> list[str]:
    """``train_argv`` with an experiment file's path made absolute."""
    from tftrain import registry

    out = []
    for arg in train_argv:
        if arg.startswith("--experiment="):
            arg = "--experiment=" + registry.absolute(arg.split("=", 1)[1])
        out.append(arg)
    return out


def main(argv: list[str]) -> None:
    from absl import flags

    from tftrain.cli import _quiet_tensorflow
    from tftrain.config import ConfigError
    from tftrain.flagset import fail as _fail

    # The training flags are checked here with TensorFlow loaded: its C++
    # start-up lines would come before the cluster's own.
    _quiet_tensorflow()
    fv = flags.FLAGS
    train_argv = list(argv[1:])
    if not train_argv:
        _fail(
            "no training flags: expected "
            "tftrain launch --num_workers=N -- --experiment=... --model_dir=..."
        )
    if fv.nnodes > 1:
        said = None
        if not fv.coordinator:
            said = f"--nnodes={fv.nnodes} needs --coordinator=HOST:PORT (node 0's address)"
        elif fv.node_rank >= fv.nnodes:
            said = f"--node_rank={fv.node_rank}: expected 0 to {fv.nnodes - 1} for --nnodes"
        elif fv.num_ps or fv.evaluator:
            said = (
                "--num_ps and --evaluator run on one machine: a parameter-server cluster "
                "over several machines runs under Slurm or Kubernetes (README.md)"
            )
        elif fv.emit:
            said = "--emit writes one manifest for the whole cluster: leave out --nnodes"
        if said:
            _fail(said + ".")
    if fv.evaluator and not fv.num_ps:
        _fail(
            "--evaluator needs parameter servers (--num_ps=M): the "
            "evaluator task evaluates a parameter-server run's checkpoints."
        )
    spec = cluster_spec(
        fv.num_workers * fv.nnodes,
        fv.num_ps,
        range(1, fv.num_workers * fv.nnodes + fv.num_ps + 3),
        host="host",
        evaluator=fv.evaluator,
    )
    if fv.emit != "tfjob" and fv.check_memory:
        local = fv.num_workers if fv.nnodes > 1 else len(tasks_of(spec))
        said = check_memory(local, resources.available_memory())
        if said:
            _fail(said)
    from tftrain.errors import UserCodeError

    try:
        config = check_train_argv(train_argv, spec)
        from tftrain import fileio

        fileio.check_scheme(config.model_dir)
        fileio.check_shared(config.model_dir)
        if fv.emit == "tfjob":
            from tftrain.distribute.tfjob import check_for_kubernetes

            volumes = check_for_kubernetes(
                config,
                fv.job_name,
                fv.task_cpu,
                fv.task_memory,
                volumes=fv.volume,
                gpus=fv.task_gpus,
                image=fv.image,
            )
    except UserCodeError as e:
        from tftrain.flagset import user_code_failed

        user_code_failed(e)
    except ConfigError as e:
        _fail(str(e))
    if fv.emit != "tfjob":
        try:
            fileio.check_reachable(config.model_dir)
        except ConfigError as e:
            _fail(str(e))
        # Every task gets the same experiment, wherever it starts.
        train_argv = with_absolute_experiment(train_argv)
    if fv.emit == "tfjob":
        from tftrain.distribute.tfjob import tfjob_manifest

        sys.stdout.write(
            tfjob_manifest(
                job_name=fv.job_name,
                image=fv.image,
                cpu=fv.task_cpu,
                memory=fv.task_memory,
                num_workers=fv.num_workers,
                num_ps=fv.num_ps,
                train_argv=train_argv,
                evaluator=fv.evaluator,
                volumes=volumes,
                gpus=fv.task_gpus,
                backoff_limit=fv.backoff_limit,
                ttl_secs=fv.ttl_secs,
                clean_pod_policy=fv.clean_pod_policy,
            )
        )
        return
    from tftrain import checkpoints, fileio, runlock
    from tftrain.distribute import rendezvous

    span = server = None
    if fv.nnodes > 1:
        agreed = [
            *argv[1:],
            f"--max_restarts={fv.max_restarts}",
            f"--num_workers={fv.num_workers}",
            f"--threads_per_task={fv.threads_per_task}",
        ]
        key = rendezvous.fingerprint(agreed, fv.nnodes, fv.num_workers)
        try:
            coordinator = rendezvous.parse_address(fv.coordinator)
            if fv.node_rank == 0:
                server = rendezvous.Server(*coordinator, fv.nnodes, fv.rendezvous_timeout_secs)
            node = rendezvous.Node(
                coordinator, fv.node_rank, fv.rendezvous_timeout_secs, key, flags=agreed
            )
            host = fv.node_host or (coordinator[0] if fv.node_rank == 0 else None)
            host = host or node.local_host()
        except ConfigError as e:
            _fail(str(e))
        except OSError as e:
            _fail(f"cannot reach --coordinator={fv.coordinator} ({e.strerror or e}).")
        span = Span(node, fv.node_rank, host)
    lock = runlock.NoLock()
    aside = None
    try:
        if fv.node_rank == 0:  # node 0 writes the folder and holds it
            lock = runlock.for_launcher(config.model_dir)
            aside = checkpoints.set_aside_run(config.model_dir) if config.restart else None
    except ConfigError as e:
        _fail(str(e))
    if not fileio.is_url(config.model_dir) and fv.node_rank == 0:
        os.environ[runlock.HELD_FOR] = os.path.abspath(config.model_dir)
    if aside:
        print(f"[launch] --restart: moved the earlier run's files to {aside}.", flush=True)
    if config.restart:
        train_argv = [*train_argv, "--norestart"]  # once, not on every restart
    try:
        code = run(
            num_workers=fv.num_workers,
            num_ps=fv.num_ps,
            train_argv=train_argv,
            max_restarts=fv.max_restarts,
            threads_per_task=fv.threads_per_task,
            stop_grace_secs=fv.stop_grace_secs,
            evaluator=fv.evaluator,
            span=span,
        )
    finally:
        lock.release()
        if server is not None:
            server.close()
    sys.exit(code)

"""``tftrain plan``: which parallel mode for this model on this cluster.

It measures on this machine what it can (a training step's time at two
batches on all the cores and on each task's share of them, the model's
bytes and its pipeline cuts, tftrain's TCP ring and a parameter-server
update over gRPC on loopback), takes the rest from ``--cluster``, predicts
every mode with ``tftrain.costmodel``, and prints them ranked by
examples/s with the command of the best. ``--measure`` then runs each mode
this machine can run, as ``tftrain train`` or ``tftrain launch`` would, and
prints the measured speed beside the predicted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from tftrain import costmodel, lifeline
from tftrain.config import ConfigError

_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_LATENCY = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
DEFAULT_NETWORK = "10Gbit/s,50us"


def define_flags(flag_values) -> None:
    from absl import flags

    flags.DEFINE_string(
        "cluster",
        "local",
        "where the run would go: 'local' (this machine's cores shared by its tasks), or "
        "'N[xcpu:C][,BANDWIDTH][,LATENCY]': N workers of C cores each (default: this "
        f"machine's count) joined by a network ({DEFAULT_NETWORK} unless given), e.g. "
        "4xcpu:16,25Gbit/s,20us",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "max_ps",
        2,
        "parameter-server rows for 1 to this many servers",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "measure",
        False,
        "also run each mode this machine can run for a short stretch (launched as a real run "
        "would be) and print measured against predicted",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "measure_secs",
        20.0,
        "seconds of training each measured mode gets (about)",
        lower_bound=1.0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "measure_rounds",
        1,
        "rounds of --measure, each mode once a round in a rotated order; each figure is "
        "the median over the rounds (this machine's speed drifts from run to run)",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "probe_rounds",
        3,
        "how many times each step-time probe runs (a process each); each figure is the "
        "median over them (one probe run can read 20% off)",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output", "plan.json", "where the plan goes (JSON)", flag_values=flag_values
    )
    flags.DEFINE_string(
        "logdir",
        "",
        "write the predicted scaling curves (examples/s against workers and against the "
        "global batch) as TensorBoard scalars here",
        flag_values=flag_values,
    )


# -- the cluster --------------------------------------------------------------


def parse_bandwidth(text: str) -> float:
    m = re.fullmatch(
        r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(bit/s|bps|b/s|byte/s|bytes/s)\s*", text, re.I
    )
    if not m:
        raise ConfigError(
            f"bandwidth {text!r}: expected a number and a unit, e.g. 10Gbit/s, 1.25GB/s, 100Mbps."
        )
    unit = m.group(3)
    # B/s and byte(s)/s are bytes; bit/s, bps and b/s bits.
    per = 1 if unit == "B/s" or unit.lower().startswith("byte") else 1 / 8
    value = float(m.group(1)) * _PREFIX[m.group(2).lower()] * per
    if value <= 0:
        raise ConfigError(f"bandwidth {text!r}: expected more than zero.")
    return value


def parse_latency(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+(?:e-?[0-9]+)?)\s*(ns|us|µs|ms|s)\s*", text)
    if not m:
        raise ConfigError(f"latency {text!r}: expected a number and a unit, e.g. 50us, 0.2ms.")
    return float(m.group(1)) * _LATENCY[m.group(2)]


def parse_cluster(text: str, cores: int) -> costmodel.Cluster:
    """``local`` or ``N[xcpu:C][,BANDWIDTH][,LATENCY]``.

    Raises:
      ConfigError: a spec that does not parse, in one line.
    """
    text = text.strip()
    if text == "local":
        return costmodel.Cluster(
            workers=max(cores, 2),
            cores_per_task=cores,
            network=costmodel.Link(1e12, 0),
            cores=cores,
        )
    head, *rest = [p.strip() for p in text.split(",")]
    m = re.fullmatch(r"(\d+)\s*(?:x\s*(?:cpu:(\d+)|(\w+.*)))?", head)
    if not m or m.group(3):
        said = (
            f"--cluster={text}: expected 'local' or N[xcpu:C][,BANDWIDTH][,LATENCY], "
            "e.g. 4xcpu:16,25Gbit/s,20us"
        )
        if m and m.group(3):
            said += (
                f" (devices other than CPU cores, such as {m.group(3)!r}, cannot be measured here)"
            )
        raise ConfigError(said + ".")
    workers, per = int(m.group(1)), int(m.group(2) or cores)
    if workers < 1 or per < 1:
        raise ConfigError(f"--cluster={text}: expected at least 1 worker of at least 1 core.")
    if len(rest) > 2:
        raise ConfigError(f"--cluster={text}: expected at most a bandwidth and a latency after N.")
    bandwidth_text, latency_text = (rest + [None, None])[:2]
    default_bw, default_lat = DEFAULT_NETWORK.split(",")
    return costmodel.Cluster(
        workers=workers,
        cores_per_task=per,
        network=costmodel.Link(
            parse_bandwidth(bandwidth_text or default_bw),
            parse_latency(latency_text or default_lat),
        ),
        local=False,
    )


# -- measurements ---------------------------------------------------------------


def _probe_env(env=None) -> dict:
    if env is None:  # a probe of this machine, not a task of the user's cluster
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return dict(env, TF_CPP_MIN_LOG_LEVEL="2")


# The processes the plan has started: a plan stopped by a signal stops the
# live ones first (a launched probe would otherwise train on to its bounded
# end, minutes later).
_children: list = []
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A launched probe's tasks have the launch's --stop_grace_secs (30) to stop
# after its SIGTERM; the launch gets that and a margin.
STOP_GRACE = 45.0
_starting = {"now": False, "signal": None}


class Stopped(BaseException):
    """A signal asked the plan to stop. Raised where the plan was, so that
    whatever it waited on is left before its children are stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, _frame) -> None:
    for sig in _SIGNALS:  # one stop, in order: a second signal cannot cut it short
        signal.signal(sig, signal.SIG_IGN)
    if _starting["now"]:  # raised once the child is known, in _popen
        _starting["signal"] = signum
        return
    raise Stopped(signum)


def listen_for_stop(on: bool) -> None:
    """From here a signal stops the plan and its children (``on``), or
    stops it as any program (once its measurements are done)."""
    for sig in _SIGNALS:
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        signal.signal(sig, _on_signal if on else default)


def _popen(args: list[str], **kwargs) -> subprocess.Popen:
    # A process group of its own: a Ctrl-C at the terminal reaches the plan
    # alone, which then stops its children in order.
    _starting["now"] = True
    try:
        proc = subprocess.Popen(args, process_group=0, **kwargs)
        _children[:] = [p for p in _children if p.poll() is None] + [proc]
    finally:
        _starting["now"] = False
        if _starting["signal"] is not None:
            raise Stopped(_starting["signal"])
    return proc


def _run(args: list[str], timeout: float, env) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)``, its process
    one of ``_children``; past ``timeout`` it gets SIGTERM, then SIGKILL
    after ``STOP_GRACE`` seconds (a launch stops its tasks in between)."""
    proc = _popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        lifeline.signal_group(proc, signal.SIGTERM)
        try:
            proc.communicate(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            lifeline.signal_group(proc, signal.SIGKILL)
            proc.communicate()
        raise
    except Stopped:
        raise  # main stops it with the rest, in order
    except BaseException:
        lifeline.signal_group(proc, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def stop_children(grace: float = STOP_GRACE) -> None:
    """SIGTERM to every live child (a ``tftrain launch`` then stops its tasks
    in order), SIGKILL to any still alive after ``grace`` seconds."""
    lifeline.stop_groups(_children, grace)


def _python(args: list[str], timeout: float, env=None) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "tftrain.plan_probe", *args], timeout, _probe_env(env))


def _probe(kind: str, request: dict, timeout: float = 1800, env=None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        ask, answer = os.path.join(folder, "request.json"), os.path.join(folder, "result.json")
        with open(ask, "w") as f:
            json.dump(request, f)
        done = _python([kind, ask, answer], timeout, env)
        if not os.path.exists(answer):
            tail = "\n".join((done.stderr or "").strip().splitlines()[-15:])
            raise RuntimeError(f"the {kind} measurement failed:\n{tail}")
        with open(answer) as f:
            return json.load(f)


def median_of(results: list):
    """One result from several of the same probe: each number the median of
    its values, anything else the first's."""
    first = results[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in results if k in r]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(results)
    return first


def _probe_rounds(kind: str, request: dict, rounds: int) -> dict:
    """``kind``'s probe ``rounds`` times, each in a process of its own, as one
    result of medians (whatever is measured once, such as the model's
    profile, only in the first)."""
    results = [_probe(kind, request)]
    request = {k: v for k, v in request.items() if k != "profile"}
    results += [_probe(kind, request) for _ in range(rounds - 1)]
    return median_of(results)


def _probes_side_by_side(
    request: dict, tasks: int, timeout: float = 1800, pinned: bool = False
) -> list[dict]:
    """The compute probe in ``tasks`` processes at once, their timed runs
    started together; ``pinned``: each on cores of its own, as ``tftrain
    launch`` pins its tasks when there are enough to go round."""
    from tftrain import resources

    env = _probe_env()
    with tempfile.TemporaryDirectory() as folder:
        procs = []
        for rank in range(tasks):
            ask = os.path.join(folder, f"request-{rank}.json")
            mine = dict(request, together={"folder": folder, "rank": rank, "tasks": tasks})
            cores = resources.core_share(rank, tasks) if pinned else None
            if cores:
                mine["cores"] = cores
            with open(ask, "w") as f:
                json.dump(mine, f)
            answer = os.path.join(folder, f"result-{rank}.json")
            procs.append(
                (
                    _popen(
                        [sys.executable, "-m", "tftrain.plan_probe", "compute", ask, answer],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=env,
                    ),
                    answer,
                )
            )
        results = []
        try:
            for proc, answer in procs:
                _, err = proc.communicate(timeout=timeout)
                if not os.path.exists(answer):
                    tail = "\n".join((err or "").strip().splitlines()[-15:])
                    raise RuntimeError(f"the side-by-side compute measurement failed:\n{tail}")
                with open(answer) as f:
                    results.append(json.load(f))
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return results


def half_in_microbatches(batch: int, microbatches: int) -> int:
    """About half of ``batch``, in whole micro-batches: the second batch the
    pipelines' probes run at."""
    return batch // 2 // microbatches * microbatches


# A synchronous data-parallel replica's step: one replica through the
# strategy (on CPU as fast as one launched multi_worker_mirrored worker's;
# BUILD_NOTES.md, rounds four and five).
REPLICA = {"strategy": "mirrored", "num_replicas": 1}


def measure_compute(
    train_argv, config, cores: int, stages, microbatches, log, rounds: int = 1
) -> tuple:
    """(Compute, model dict, memory) from steps at the global batch and half of
    it, on all of ``cores`` and on half of them; each step-time probe the
    median of ``rounds`` runs."""
    batch = config.batch_size
    batches = sorted({batch, max(batch // 2, 1)})
    counts = sorted({cores, max(cores // 2, 1)}, reverse=True)
    fits, micro, model, memory = [], [], None, {}
    for c in counts:
        log(f"measuring training steps at batches {batches} on {c} core(s)...")
        got = _probe_rounds(
            "compute",
            {
                "train_argv": train_argv,
                "threads": c,
                "batches": batches,
                # The median of 3 timed runs of about 2 s: single runs of
                # 4 s put the MLP's step anywhere in 1.5-2.5 ms, against
                # 1.6 ms in the --measure runs of 15 s (BUILD_NOTES.md,
                # round six).
                "seconds": 2.0,
                "repeats": 3,
                "profile": model is None,
                "stages": stages,
                "microbatches": {str(k): m for k, m in microbatches.items()},
            },
            rounds,
        )
        model = model or got.get("model")
        memory = memory or {
            "base": got["base_memory"],
            "peak": got["peak_memory"],
            "input": got.get("input_examples_per_second"),
        }
        seconds = {int(b): 1 / s for b, s in got["steps_per_second"].items()}
        if len(batches) == 1:
            b = batches[0]
            fits.append((c, 0.0, seconds[b] / b))
        else:
            lo, hi = batches
            slope = (seconds[hi] - seconds[lo]) / (hi - lo)
            if slope <= 0 or seconds[hi] - slope * hi < 0:
                # Noise larger than the batch's effect: all of it per example.
                fits.append((c, 0.0, seconds[hi] / hi))
            else:
                fits.append((c, seconds[hi] - slope * hi, slope))
        for m, rate in got.get("microbatched_steps_per_second", {}).items():
            # What each micro-batch past the first added to the step.
            extra = (1 / rate - seconds[batch]) / (int(m) - 1)
            micro.append((c, max(extra, 0.0)))
    compute = costmodel.Compute(tuple(fits), tuple(micro))
    crowding, replicas = [], []
    if cores >= 2:
        # Two tasks of this machine at once, each on half the cores, with
        # the thread settings tftrain gives a launched task: how much slower
        # a step is than one such task alone (crowding).
        from tftrain import resources

        half, share = max(batch // 2, 1), cores // 2
        log(
            f"measuring training steps of 2 tasks side by side, each at batch {half} "
            f"on {share} core(s)..."
        )
        request = {
            "train_argv": train_argv,
            "threads": share,
            "inter_op_threads": resources.cluster_inter_op_threads(2),
            "thread_spinning": False,
            "batches": [half],
            "seconds": 4.0,
        }

        def side_by_side(request, pinned=False) -> float:
            # Each round: the mean step of the two tasks; the median over rounds.
            return statistics.median(
                statistics.mean(
                    1 / r["steps_per_second"][str(half)]
                    for r in _probes_side_by_side(request, 2, pinned=pinned)
                )
                for _ in range(rounds)
            )

        side = side_by_side(request)
        crowding.append((2, side / compute.seconds(half, share)))
        # The same through the strategy, one replica a task (as a 2-worker
        # launch pins them, each on its cores), and one such replica alone.
        log("measuring a data-parallel replica's step, alone and 2 side by side...")
        replica = dict(request, mode=REPLICA)
        try:
            alone = 1 / _probe_rounds("compute", replica, rounds)["steps_per_second"][str(half)]
            side = side_by_side(replica, pinned=True)
        except RuntimeError as e:
            log(
                f"  (no replica step: {str(e).splitlines()[0]}; data parallelism from the crowding)"
            )
        else:
            one = compute.seconds(half, share)
            replicas += [(1, alone / one), (2, side / one)]
    steps, larger = [], []
    if model and not model.get("cannot_cut"):
        for k in stages:
            if str(k) in model.get("stages", {}):
                m = microbatches[k]
                # And at about half the global batch (a whole number of
                # micro-batches): the pipeline's own cost per example.
                more = half_in_microbatches(batch, m)
                log(f"measuring model_parallel's schedule in one process ({k} stages)...")
                got = _probe_rounds(
                    "pipeline",
                    {
                        "train_argv": train_argv,
                        "stages": k,
                        "microbatches": m,
                        "batch": more if more > m else None,
                    },
                    rounds,
                )
                steps.append((k, m, got["step_seconds"]))
                if got.get("batch_step_seconds"):
                    larger.append((k, m, more, got["batch_step_seconds"]))
    compute = dataclasses.replace(
        compute,
        crowding=tuple(crowding),
        pipeline_steps=tuple(steps),
        pipeline_batches=tuple(larger),
        replicas=tuple(replicas),
    )
    return compute, model, memory


def measure_ring(nbytes: int, log) -> costmodel.Link:
    """tftrain's TCP ring between 2 processes on loopback, at 4 KiB and at
    ``nbytes``: latency per hop and bandwidth."""
    from tftrain.distribute import launch

    log("measuring tftrain's TCP ring on loopback...")
    ports = [int(a.rsplit(":", 1)[1]) for a in launch.free_cluster_spec(2)["worker"]]
    small, large = 4096, max(int(nbytes), 8192)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    procs = [
        _popen(
            [
                sys.executable,
                "-m",
                "tftrain.plan_probe",
                "ring",
                str(rank),
                *map(str, ports),
                str(small),
                str(large),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    try:
        out = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # its peer failed: it would wait on for it
                p.kill()
                p.wait()
    if not out[0][0].strip():
        raise RuntimeError(f"the ring measurement failed:\n{out[0][1][-2000:]}")
    t = json.loads(out[0][0].strip().splitlines()[-1])
    t_small, t_large = t[str(small)], t[str(large)]
    # Two workers: 2 hops, each of half the bytes (costmodel.ring_seconds).
    per_byte = max((t_large - t_small) / (large - small), 1e-13)
    return costmodel.Link(bandwidth=1 / per_byte, latency=max(t_small - small * per_byte, 0) / 2)


def measure_grpc(
    shapes: list,
    train_argv: list,
    log,
    workers: int = 1,
    ps: int = 1,
    steps_per_loop: int = 10,
    pass_bytes: int | None = None,
) -> dict:
    """Parameter-server updates through TensorFlow's gRPC on loopback, the
    ``workers`` updating at once, no compute: a chief (here, in a probe),
    the workers and ``ps`` servers. Returns seconds per update of the
    model's variables (``full``) and of as many one-value ones (``tiny``),
    and one round trip to a server."""
    from tftrain.distribute import launch

    log(
        f"measuring parameter-server updates over gRPC on loopback ({workers} worker(s), "
        f"{ps} ps)..."
    )
    addresses = launch.free_cluster_spec(1 + workers + ps)["worker"]
    spec = {
        "chief": addresses[:1],
        "worker": addresses[1 : 1 + workers],
        "ps": addresses[1 + workers :],
    }
    servers = []
    code = (
        "from tftrain import resources; resources.prepare_memory()\n"
        "import os, json, tensorflow as tf\n"
        "c = tf.distribute.cluster_resolver.TFConfigClusterResolver()\n"
        "tf.distribute.Server(c.cluster_spec(), job_name=c.task_type, task_index=c.task_id,"
        " protocol='grpc', start=True).join()\n"
    )
    try:
        for role in ("worker", "ps"):
            for index in range(len(spec[role])):
                env = dict(
                    os.environ,
                    TF_CPP_MIN_LOG_LEVEL="2",
                    TF_CONFIG=json.dumps({"cluster": spec, "task": {"type": role, "index": index}}),
                )
                servers.append(
                    _popen(
                        [sys.executable, "-c", code],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps({"cluster": spec, "task": {"type": "chief", "index": 0}}),
        )
        request = {
            "shapes": shapes,
            "steps_per_loop": steps_per_loop,
            "train_argv": train_argv,
            "pass_bytes": pass_bytes,
        }
        return _probe("grpc", request, timeout=600, env=env)
    finally:
        for s in servers:
            s.kill()
            s.wait()


# The batch of the parameter-server probe: one example, so that an update
# is nearly all the mode's own cost.
PS_PROBE_BATCH = 1


def measure_launched(
    name: str,
    flags: list,
    launch: dict,
    train_argv,
    config,
    batch: int,
    guess: float,
    log,
    rounds: int = 1,
) -> float:
    """Seconds a step of the mode (``flags``, launched on this machine as
    ``launch`` says) at ``batch`` examples: the median of ``rounds`` short
    runs of about 4 s (sized by ``guess``, the step's seconds), each
    launched as a real run is."""
    probe = costmodel.Prediction(f"{name}, at batch {batch}", flags, launch, 0.0, 0.0, "", 0)
    probe.examples_per_second = batch / max(guess, 1e-4)
    argv = [a for a in train_argv if not a.startswith("--batch_size=")]
    argv.append(f"--batch_size={batch}")
    small = config.replace(batch_size=batch)
    rates = []
    for _ in range(max(rounds, 1)):
        rate = measure_mode(probe, argv, small, 4.0, log)
        if rate is None:
            raise RuntimeError(f"the probe of {name} at batch {batch} failed")
        rates.append(rate / batch)
    return 1 / statistics.median(rates)


def measure_at_batches(
    name: str,
    flags: list,
    launch: dict,
    batches: tuple,
    guess,
    instead: str,
    train_argv,
    config,
    log,
    rounds: int = 1,
) -> tuple:
    """The mode launched here at each of ``batches`` in turn (``guess(batch)``:
    about a step's seconds, to size the runs): ((batch, seconds a step), ...).
    A failure at the first batch raises; a later one ends the points there,
    with one line saying what the prediction uses ``instead`` of the line."""
    points = []
    for batch in batches:
        try:
            seconds = measure_launched(
                name, flags, launch, train_argv, config, batch, guess(batch), log, rounds
            )
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            if not points:
                raise
            log(f"  (no probe of {name} at batch {batch}: {e}; {instead})")
            break
        points.append((batch, seconds))
    return tuple(points)


def measure_ps_updates(
    train_argv, config, compute, workers: int, ps: int, update: float, log, rounds: int = 1
) -> tuple:
    """``parameter_server`` launched on this machine with ``workers`` workers
    and ``ps`` servers, at ``PS_PROBE_BATCH`` examples a step and at about
    half the global batch: ((batch, seconds per update), ...). The servers'
    traffic, the coordinator's dispatch, the run's bookkeeping (the update
    counter, the step's statistics) and the workers' compute, all sharing
    the cores as a real run's do. A probe of bare variable updates missed
    about 0.8 ms of an MLP's 5.8 ms update, and the workers' compute timed
    apart missed what the ResNet's lose to the servers (BUILD_NOTES.md,
    rounds six and seven). ``update``: about what one costs, to size the
    runs."""

    half = config.batch_size // 2
    return measure_at_batches(
        f"parameter_server {workers} workers, {ps} ps",
        ["--strategy=parameter_server"],
        {"num_workers": workers, "num_ps": ps},
        (PS_PROBE_BATCH, half) if half > PS_PROBE_BATCH else (PS_PROBE_BATCH,),
        lambda b: compute.seconds(b, 1) * compute.crowded(workers) / workers + update,
        "the one-example rule",
        train_argv,
        config,
        log,
        rounds,
    )


def measure_launched_pipeline(
    train_argv, config, compute, stages: int, microbatches: int, log, rounds: int = 1
):
    """``model_parallel`` launched on this machine, ``stages`` processes, at
    one example per micro-batch and at about half the global batch:
    ((batch, seconds a step), ...). Its passes, dispatch and bookkeeping,
    and what an example costs the stages' processes on these cores (about
    twice one_device's for the MLP; a model of passes timed with nothing
    computing missed its step by 37%: BUILD_NOTES.md, round six)."""
    larger = half_in_microbatches(config.batch_size, microbatches)
    if larger <= microbatches:
        return ()
    return measure_at_batches(
        f"model_parallel {stages} stages, {microbatches} micro-batches (launched)",
        ["--strategy=model_parallel", f"--num_microbatches={microbatches}"],
        {"num_workers": stages},
        (microbatches, larger),
        lambda b: compute.seconds(b, 1) + 5e-3,
        "modelled from its parts",
        train_argv,
        config,
        log,
        rounds,
    )


def grpc_link(timings: dict, shapes: list) -> costmodel.Link:
    """gRPC's bandwidth, from the bytes one update moves (each variable read
    and written), and its latency per message: a one-value update's time
    over its messages (a read and a write of each variable)."""
    moved = 2 * sum(4 * math.prod(s) for s in shapes)
    per_byte = max((timings["full"] - timings["tiny"]) / max(moved, 1), 1e-13)
    return costmodel.Link(1 / per_byte, timings["tiny"] / max(2 * len(shapes), 1))


# -- predictions ----------------------------------------------------------------


def predictions(
    model,
    compute,
    batch,
    cluster,
    links,
    max_ps: int,
    stages,
    microbatches,
    input_rate=None,
    cores: int = 1,
):
    """Every mode that applies, fastest first. ``input_rate``: examples/s
    the training stream gives on this machine's ``cores`` (a remote worker
    reads in proportion to its cores; every worker reads)."""
    one_rate = all_rate = input_rate
    if input_rate and not cluster.local:
        one_rate = input_rate * cluster.cores_per_task / max(cores, 1)
        all_rate = one_rate * cluster.workers
    rows = [costmodel.one_device(model, compute, batch, cluster, one_rate)]
    if cluster.local and cluster.cores >= 2:
        rows.append(costmodel.mirrored(model, compute, batch, cluster, 2, one_rate))
    n = cluster.workers
    if n >= 2:
        for collective in ("tcp", "grpc"):
            rows.append(
                costmodel.multi_worker(model, compute, batch, cluster, links, collective, all_rate)
            )
        for ps in range(1, max_ps + 1):
            rows.append(
                costmodel.parameter_server(model, compute, batch, cluster, links, ps, all_rate)
            )
    for k in stages:
        if k not in model.stages or (k > max(n, 1) and not cluster.local):
            continue  # a model model_parallel cannot cut so (said by the caller)
        for processes in (False, True) if cluster.local else (True,):
            rows.append(
                costmodel.model_parallel(
                    model, compute, batch, cluster, links, k, microbatches[k], processes, one_rate
                )
            )
    base = rows[0].examples_per_second
    for r in rows:
        r.efficiency = r.examples_per_second / base
    return sorted(rows, key=lambda r: -r.examples_per_second)


def _model_of(profile: dict, memory: dict, batch: int) -> costmodel.Model:
    # The probe's peak memory at the global batch, less what the model adds,
    # is a task's base: TensorFlow, the data, the runtime.
    stage_info = profile.get("stages", {})
    model = costmodel.Model(
        parameter_bytes=profile["parameter_bytes"],
        sparse_bytes_per_example=profile["sparse_bytes_per_example"],
        embedding_bytes=profile["embedding_bytes"],
        optimizer_slots=profile["optimizer_slots"],
        activation_bytes_per_example=profile["activation_bytes_per_example"],
        base_memory=max(
            memory["peak"]
            - profile["parameter_bytes"] * (2 + profile["optimizer_slots"])
            - profile["activation_bytes_per_example"] * batch,
            0,
        ),
        stages={
            int(k): (tuple(v["shares"]), tuple(v["cut_bytes_per_example"]))
            for k, v in stage_info.items()
        },
    )
    return model


# The modes launched here at two batches, in plan.json: {(a, b): ((batch,
# seconds), ...)} as [[a, b, [[batch, seconds], ...]], ...].
def _points_out(measured: dict) -> list:
    return [[a, b, [list(point) for point in points]] for (a, b), points in measured.items()]


def _points_in(rows: list) -> dict:
    return {(a, b): tuple(map(tuple, points)) for a, b, points in rows}


def _points_readable(rows: list, what: str) -> dict:
    return {
        f"{what.format(a, b)}, batch {batch}": seconds
        for a, b, points in rows
        for batch, seconds in points
    }


def inputs_document(compute, model, links, stages, microbatches, max_ps, input_rate) -> dict:
    """Everything the predictions were made from, as JSON (plan.json's
    ``inputs``): ``predictions_of`` makes them again, for this or another
    cluster, with this version's cost model."""
    return {
        "compute": {
            "fits": [list(f) for f in compute.fits],
            "microbatch": [list(m) for m in compute.microbatch],
            "crowding": [list(c) for c in compute.crowding],
            "pipeline_steps": [list(p) for p in compute.pipeline_steps],
            "pipeline_batches": [list(p) for p in compute.pipeline_batches],
            "replicas": [list(r) for r in compute.replicas],
        },
        "model": {
            **{k: v for k, v in dataclasses.asdict(model).items() if k != "stages"},
            "stages": {str(k): [list(a), list(b)] for k, (a, b) in model.stages.items()},
        },
        "links": {
            "ring": dataclasses.asdict(links.ring),
            "ring_call": links.ring_call,
            "grpc": dataclasses.asdict(links.grpc),
            "ps_step": links.ps_step,
            "grpc_pack": links.grpc_pack,
            "grpc_round_trip": links.grpc_round_trip,
            "local_ps": [[w, p, t] for (w, p), t in links.local_ps.items()],
            "local_ps_batch": links.local_ps_batch,
            "local_ps_steps": _points_out(links.local_ps_steps),
            "local_pipeline": _points_out(links.local_pipeline),
            "pipeline_passes": {k: list(v) for k, v in links.pipeline_passes.items()},
        },
        "stages": list(stages),
        "microbatches": {str(k): m for k, m in microbatches.items()},
        "max_ps": max_ps,
        "input_examples_per_second": input_rate,
    }


def readable_inputs(inputs: dict) -> dict:
    """plan.json's ``measured_inputs``: what was measured, from ``inputs``,
    named for a person reading it."""
    c, li = inputs["compute"], inputs["links"]
    return {
        "compute": [
            {"cores": n, "step_overhead_seconds": o, "seconds_per_example": e}
            for n, o, e in c["fits"]
        ],
        # What each micro-batch past the first adds, per core count, and the
        # crowding factor of tasks side by side (costmodel.Compute).
        "microbatch_seconds": {str(n): t for n, t in c["microbatch"]},
        "crowding": {str(n): f for n, f in c["crowding"]},
        # A data-parallel replica's step over one_device's: alone ("1") and
        # side by side ("2").
        "replica_step": {str(n): f for n, f in c.get("replicas", [])},
        "pipeline_step_seconds": {
            f"{k} stages, {m} micro-batches": t for k, m, t in c["pipeline_steps"]
        },
        "pipeline_step_seconds_at_batch": {
            f"{k} stages, {m} micro-batches, batch {b}": t
            for k, m, b, t in c.get("pipeline_batches", [])
        },
        "pipeline_cuts": {
            k: {"shares": shares, "cut_bytes_per_example": cut}
            for k, (shares, cut) in inputs["model"]["stages"].items()
        },
        "parameter_bytes": inputs["model"]["parameter_bytes"],
        "input_examples_per_second": inputs["input_examples_per_second"],
        "ring_call_seconds": li["ring_call"],
        "ring": {
            "bandwidth_bytes_per_second": li["ring"]["bandwidth"],
            "latency_seconds": li["ring"]["latency"],
        },
        "grpc": {
            "bandwidth_bytes_per_second": li["grpc"]["bandwidth"],
            "latency_seconds": li["grpc"]["latency"],
            "ps_update_seconds": li["ps_step"],
            "round_trip_seconds": li["grpc_round_trip"],
            # The mode run here at this batch (0: bare updates, no compute).
            "ps_updates_here_seconds": {f"{w} workers, {p} ps": t for w, p, t in li["local_ps"]},
            "ps_updates_here_batch": li.get("local_ps_batch", 0),
            # And at each batch it was launched at (the line the model follows).
            "ps_updates_here_seconds_at_batch": _points_readable(
                li.get("local_ps_steps", []), "{} workers, {} ps"
            ),
        },
        # model_parallel launched here: its step's seconds at each batch.
        "pipeline_launched_here_seconds": _points_readable(
            li.get("local_pipeline", []), "{} stages, {} micro-batches"
        ),
        # A cut's tensor passed between two stages' devices: seconds per pass
        # and a step's fixed cost.
        "pipeline_passes": {
            where: {"per_pass_seconds": per, "fixed_seconds": fixed}
            for where, (per, fixed) in li["pipeline_passes"].items()
        },
    }


def predictions_of(document: dict, cluster_text: str | None = None) -> list:
    """The predictions of a plan.json's ``inputs`` for ``cluster_text``
    (default: the plan's own cluster)."""
    i = document["inputs"]
    c = i["compute"]
    # What an earlier version did not measure is absent: nothing measured.
    compute = costmodel.Compute(
        **{
            k: tuple(map(tuple, c.get(k, [])))
            for k in (
                "fits",
                "microbatch",
                "crowding",
                "pipeline_steps",
                "pipeline_batches",
                "replicas",
            )
        }
    )
    model = costmodel.Model(
        **{k: v for k, v in i["model"].items() if k != "stages"},
        stages={int(k): (tuple(a), tuple(b)) for k, (a, b) in i["model"]["stages"].items()},
    )
    li = i["links"]
    links = costmodel.Links(
        ring=costmodel.Link(**li["ring"]),
        ring_call=li["ring_call"],
        grpc=costmodel.Link(**li["grpc"]),
        ps_step=li["ps_step"],
        grpc_pack=li["grpc_pack"],
        grpc_round_trip=li["grpc_round_trip"],
        local_ps={(w, p): t for w, p, t in li["local_ps"]},
        # Absent (plan.json before it): measured as bare updates, no compute.
        local_ps_batch=li.get("local_ps_batch", 0),
        local_ps_steps=_points_in(li.get("local_ps_steps", [])),
        local_pipeline=_points_in(li.get("local_pipeline", [])),
        pipeline_passes={k: tuple(v) for k, v in li["pipeline_passes"].items()},
    )
    cores = document["cores"]
    return predictions(
        model,
        compute,
        document["global_batch"],
        parse_cluster(cluster_text or document["cluster"], cores),
        links,
        i["max_ps"],
        i["stages"],
        {int(k): m for k, m in i["microbatches"].items()},
        input_rate=i["input_examples_per_second"],
        cores=cores,
    )


# -- output ---------------------------------------------------------------------


def command_of(p: costmodel.Prediction, train_argv: list[str]) -> str:
    own = [
        a
        for a in train_argv
        if not a.startswith(
            (
                "--strategy=",
                "--num_replicas=",
                "--collective=",
                "--num_microbatches=",
                "--num_stages=",
            )
        )
    ]
    if p.launch:
        head = ["tftrain", "launch", *(f"--{k}={v}" for k, v in p.launch.items()), "--"]
    else:
        head = ["tftrain", "train"]
    return " ".join([*head, *own, *p.flags])


def table(rows, measured: dict | None) -> str:
    lines = []
    head = f"{'mode':<58}{'examples/s':>12}{'vs one':>8}  {'bound':<16}{'memory/task':>12}"
    if measured:
        head += f"{'measured':>12}{'error':>8}"
    lines.append(head)
    for r in rows:
        line = (
            f"{r.mode:<58}{r.examples_per_second:>12,.0f}{r.efficiency:>8.2f}  {r.bound:<16}"
            f"{r.memory_per_task / 2**20:>9,.0f} MiB"
        )
        if measured:
            got = measured.get(r.mode)
            if got:
                line += f"{got:>12,.0f}{(r.examples_per_second - got) / got:>+8.0%}"
            else:
                line += f"{'-':>12}{'':>8}"
        lines.append(line)
    return "\n".join(lines)


def write_curves(logdir, model, compute, batch, cluster, links, max_ps, log) -> None:
    """examples/s against workers (1 to 4x the cluster's, at this batch) and
    against the global batch (at the cluster's workers), one scalar tag per
    mode: TensorBoard draws the curves."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for n in range(1, max(4 * cluster.workers, 8) + 1):
            c = dataclasses.replace(cluster, workers=n)
            for p in (
                costmodel.multi_worker(model, compute, batch, c, links, "tcp"),
                *(
                    costmodel.parameter_server(model, compute, batch, c, links, ps)
                    for ps in range(1, max_ps + 1)
                ),
            ):
                tf.summary.scalar(f"workers/{_tag(p.mode)}", p.examples_per_second, step=n)
        b = 8
        while b <= 64 * batch:
            for p in (
                costmodel.one_device(model, compute, b, cluster),
                costmodel.multi_worker(model, compute, b, cluster, links, "tcp"),
                costmodel.parameter_server(model, compute, b, cluster, links, 1),
            ):
                tf.summary.scalar(f"batch/{_tag(p.mode)}", p.examples_per_second, step=b)
            b *= 2
    writer.close()
    log(f"Scaling curves: tensorboard --logdir={logdir}")


def _tag(mode: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", re.sub(r"\b\d+\b", "N", mode)).strip("_")


# -- --measure -------------------------------------------------------------------


def measure_mode(p, train_argv, config, seconds: float, log) -> float | None:
    """Steady-state examples/s of the mode run for about ``seconds``."""
    steps_per_second = p.examples_per_second / config.batch_size
    loop = int(min(max(round(steps_per_second * 0.5), 2), config.steps_per_loop or 100))
    steps = loop * (1 + max(math.ceil(seconds * steps_per_second / loop), 2))
    with tempfile.TemporaryDirectory() as model_dir:
        own = [
            *[
                a
                for a in train_argv
                if not a.startswith(("--model_dir=", "--train_steps=", "--steps_per_loop="))
            ],
            f"--model_dir={model_dir}",
            f"--train_steps={steps}",
            f"--steps_per_loop={loop}",
            f"--eval_interval={10**9}",
            f"--checkpoint_interval={10**9}",
            f"--max_eval_examples={config.eval_batch_size or config.batch_size}",
            "--noexport",
        ]
        command = command_of(p, own).split()[1:]
        log(f"measuring {p.mode}: {steps} steps...")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("TF_CONFIG", None)
        done = _run([sys.executable, "-m", "tftrain", *command], max(600, 20 * seconds), env)
        try:
            with open(os.path.join(model_dir, "metrics.json")) as f:
                return json.load(f)["examples_per_second"]
        except (OSError, KeyError, ValueError):
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            log(f"  {p.mode} did not finish: {tail[0]}")
            return None


# -- the command ------------------------------------------------------------------


def main(argv: list[str]) -> None:
    listen_for_stop(True)
    try:
        _plan(argv)
    except Stopped as e:
        stop_children()
        print(
            f"tftrain plan: stopped by {signal.Signals(e.signum).name}; no plan printed.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + e.signum)
    finally:
        listen_for_stop(False)


def _plan(argv: list[str]) -> None:
    from absl import flags

    from tftrain import resources
    from tftrain.cli import _quiet_tensorflow
    from tftrain.distribute import launch
    from tftrain.errors import UserCodeError
    from tftrain.flagset import fail as _fail
    from tftrain.flagset import user_code_failed

    _quiet_tensorflow()
    fv = flags.FLAGS
    train_argv = list(argv[1:])
    if not any(a.startswith("--experiment=") for a in train_argv):
        _fail(
            "expected the run to plan: tftrain plan [flags] -- --experiment=NAME [training flags]."
        )
    if not any(a.startswith("--model_dir=") for a in train_argv):
        # Measurements use folders of their own; the command printed needs one.
        named = next(a for a in train_argv if a.startswith("--experiment="))
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(named.split("=", 1)[1]))
        train_argv.append(f"--model_dir=runs/{name.removesuffix('.py')}")
    cores = resources.usable_cores()
    try:
        cluster = parse_cluster(fv.cluster, cores)
        config = launch.config_of_train_argv(train_argv)
    except UserCodeError as e:
        user_code_failed(e)
    except ConfigError as e:
        _fail(str(e))
    folder = os.path.dirname(os.path.abspath(fv.output))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        _fail(f"--output={fv.output}: cannot write there (no such folder, or not writable).")
    if fv.measure and not cluster.local:
        _fail("--measure runs the modes on this machine: use it with --cluster=local.")
    log = print
    batch = config.batch_size
    k_values = [k for k in (2,) if k <= max(cluster.workers, 2)]
    # As model_parallel would split the batch: --num_microbatches, or its default.
    microbatches = {
        k: config.replace(strategy="model_parallel", num_stages=k).microbatches for k in k_values
    }
    start = time.time()
    try:
        compute, profile, memory = measure_compute(
            train_argv, config, cores, k_values, microbatches, log, fv.probe_rounds
        )
        model = _model_of(profile, memory, batch)
        shapes = profile["variable_shapes"] or [[1]]
        loop = config.steps_per_loop or 100
        # What a 2-stage pipeline passes across its cut per micro-batch.
        cut = model.stages.get(2, ((), ()))[1]
        pass_bytes = int(cut[0] * batch / microbatches[2]) if cut else None
        one = measure_grpc(shapes, train_argv, log, 1, 1, loop, pass_bytes)
        passes = {}
        if pass_bytes is not None:
            passes["launched"] = (one["passes"]["per_pass"], one["passes"]["fixed"])
            if cluster.local:
                log("measuring tensors passed between two devices of one process...")
                here = _probe("hops", {"nbytes": pass_bytes}, timeout=600)
                passes["one process"] = (here["per_pass"], here["fixed"])
        local_ps, local_ps_steps, local_pipeline = {}, {}, {}
        if cluster.local:
            for k in k_values if not profile.get("cannot_cut") else ():
                try:
                    got = measure_launched_pipeline(
                        train_argv, config, compute, k, microbatches[k], log, fv.probe_rounds
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    log(f"  (no launched pipeline probe: {e}; modelled from its parts)")
                    continue
                if got:
                    local_pipeline[(k, microbatches[k])] = got
            for ps in range(1, fv.max_ps + 1):
                try:
                    got = measure_ps_updates(
                        train_argv,
                        config,
                        compute,
                        cluster.workers,
                        ps,
                        one["tiny"],
                        log,
                        fv.probe_rounds,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    # An experiment that cannot run at one example a step,
                    # say: the updates from the gRPC probe's links instead.
                    log(f"  (no parameter-server probe: {e}; modelled from the links)")
                    continue
                local_ps[(cluster.workers, ps)] = dict(got)[PS_PROBE_BATCH]
                if len(got) >= 2:
                    local_ps_steps[(cluster.workers, ps)] = got
        links = costmodel.Links(
            ring=measure_ring(model.parameter_bytes, log),
            ring_call=profile["ring_call_seconds"],
            grpc=grpc_link(one, shapes),
            ps_step=one["tiny"],
            grpc_round_trip=one["round_trip"],
            local_ps=local_ps,
            local_ps_batch=PS_PROBE_BATCH if local_ps else 0,
            local_ps_steps=local_ps_steps,
            local_pipeline=local_pipeline,
            pipeline_passes=passes,
        )
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        _fail(f"a measurement failed: {e}")
    if profile.get("cannot_cut"):
        log(f"No model_parallel rows: {profile['cannot_cut']}")
    rows = predictions(
        model,
        compute,
        batch,
        cluster,
        links,
        fv.max_ps,
        k_values,
        microbatches,
        input_rate=memory.get("input"),
        cores=cores,
    )
    measured = {}
    if fv.measure:
        samples: dict = {p.mode: [] for p in rows}
        for r in range(fv.measure_rounds):
            for p in rows[r % len(rows) :] + rows[: r % len(rows)]:
                got = measure_mode(p, train_argv, config, fv.measure_secs, log)
                if got:
                    samples[p.mode].append(got)
        measured = {mode: statistics.median(v) for mode, v in samples.items() if v}
    listen_for_stop(False)  # nothing runs from here: a signal ends the plan at once
    where = (
        "this machine"
        if cluster.local
        else f"{cluster.workers} workers of {cluster.cores_per_task:g} cores"
    )
    print(
        f"\nPlan for {config.experiment or config.model} at global batch {batch} on {where} "
        f"(measured in {time.time() - start:.0f} s on {cores} core(s)):\n"
    )
    print(table(rows, measured))
    best = rows[0]
    print(
        f"\nBest predicted: {best.mode}, {best.examples_per_second:,.0f} examples/s "
        f"({best.bound}-bound):"
    )
    print("  " + command_of(best, train_argv))
    if measured:
        fastest = max(measured, key=measured.get)
        print(f"Fastest measured: {fastest}, {measured[fastest]:,.0f} examples/s.")
    inputs = inputs_document(
        compute, model, links, k_values, microbatches, fv.max_ps, memory.get("input")
    )
    document = {
        "experiment": config.experiment,
        "global_batch": batch,
        "cluster": fv.cluster,
        "cores": cores,
        "measured_inputs": readable_inputs(inputs),
        "inputs": inputs,
        "modes": [
            {
                "mode": p.mode,
                "flags": p.flags,
                "launch": p.launch,
                "command": command_of(p, train_argv),
                "predicted_examples_per_second": p.examples_per_second,
                "predicted_step_seconds": p.step_seconds,
                "efficiency": p.efficiency,
                "bound": p.bound,
                "memory_per_task_bytes": p.memory_per_task,
                "communication_bound_below_batch": p.communication_bound_below_batch,
                "parts": p.parts,
                **({"measured_examples_per_second": measured.get(p.mode)} if fv.measure else {}),
            }
            for p in rows
        ],
    }
    from tftrain import fileio

    try:
        fileio.write_text_atomically(fv.output, json.dumps(document, indent=1) + "\n")
    except OSError as e:
        _fail(f"--output={fv.output}: cannot write it ({e.strerror or e}).")
    print(f"Plan written to {fv.output}.")
    if fv.logdir:
        write_curves(fv.logdir, model, compute, batch, cluster, links, fv.max_ps, log)

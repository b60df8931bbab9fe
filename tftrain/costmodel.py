"""What each parallel mode costs: the model behind ``tftrain plan``.

The inputs are measured on this machine by ``tftrain.plan`` (compute per
step, the links' bandwidth and latency) or given by the user (a cluster's
size and network); nothing here runs TensorFlow, so each direction the
model claims is tested on synthetic inputs (tests/test_plan.py). The
formulas and their sources are in BUILD_NOTES.md ("tftrain plan").
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Compute:
    """Seconds of one training step on one task: ``overhead + batch x
    per_example`` on ``cores`` cores, fitted from steps measured at two
    batches for each core count in ``fits`` ((cores, overhead, per_example)).

    Between and beyond the measured core counts each term follows Amdahl's
    law, its serial fraction fitted from the smallest and largest counts
    measured (one count: everything parallel)."""

    fits: tuple[tuple[int, float, float], ...]
    # (cores, seconds): what each micro-batch past the first adds to a step
    # (measured with --num_microbatches on one device); none measured: the
    # step's whole fixed cost.
    microbatch: tuple[tuple[int, float], ...] = ()
    # (tasks, factor): a step's time when that many tasks compute side by
    # side on this machine, each on its share of the cores, over the time
    # of one such task alone on the same share (measured; none: 1). Their
    # pools, the input threads and the runtime's own threads then compete
    # for the cores a lone task borrows (BUILD_NOTES.md).
    crowding: tuple[tuple[int, float], ...] = ()
    # (stages, micro-batches, seconds): a step of model_parallel in one
    # process at one example per micro-batch, what its schedule costs
    # beside the examples' compute (measured).
    pipeline_steps: tuple[tuple[int, int, float], ...] = ()
    # (stages, micro-batches, batch, seconds): the same schedule's step at a
    # larger batch, from which the pipeline's own cost per example is
    # fitted (none: one_device's).
    pipeline_batches: tuple[tuple[int, int, int, float], ...] = ()
    # (tasks, factor): a synchronous data-parallel replica's step (through
    # its tf.distribute strategy, one replica a task), that many side by
    # side on this machine, over one_device's step alone on the same share;
    # (1, factor): one such replica alone (measured through the strategy,
    # pinned as tftrain launch pins its tasks: the step a data-parallel run
    # takes; BUILD_NOTES.md, "round five"). None measured: the crowding.
    replicas: tuple[tuple[int, float], ...] = ()

    def seconds(self, batch: float, cores: float) -> float:
        return self._term(1, cores) + batch * self._term(2, cores)

    def crowded(self, tasks: int) -> float:
        if tasks <= 1 or not self.crowding:
            return 1.0
        return _nearest(self.crowding, tasks)

    def replicated(self, tasks: int, side_by_side: bool = True) -> float:
        """What a data-parallel replica's step costs over one_device's:
        ``tasks`` of them on this machine (``side_by_side``) or each on a
        machine of its own."""
        alone = dict(self.replicas).get(1, 1.0)
        if tasks <= 1 or not side_by_side:
            return alone
        measured = [tf for tf in self.replicas if tf[0] > 1]
        if not measured:
            return alone * self.crowded(tasks)
        return _nearest(measured, tasks)

    def microbatch_seconds(self, cores: float) -> float:
        fixed = self.seconds(0, cores)
        if not self.microbatch:
            return fixed
        # Measured as nothing at a core count: noise (a step in micro-batches
        # timed as fast as one without), as with the compute terms; the
        # nearest count that measured something.
        measured = [cm for cm in self.microbatch if cm[1] > 0] or self.microbatch
        near = min(measured, key=lambda cm: abs(cm[0] - cores))
        at_near = self.seconds(0, near[0])
        if at_near <= 0 or fixed <= 0:
            # A fixed cost measured as nothing at either count: no ratio to
            # scale by (dividing by it made a pipeline's slot 10^7 s).
            return near[1]
        # Scaled as the step's fixed cost scales between core counts.
        return near[1] * fixed / at_near

    def _term(self, index: int, cores: float) -> float:
        fits = sorted(self.fits)
        for c, *terms in fits:
            if math.isclose(c, cores):
                return terms[index - 1]
        low, high = fits[0], fits[-1]
        if low[index] <= 0 or high[index] <= 0:
            # A term measured as nothing (within the noise) at one count:
            # no law to fit; the nearest count's value.
            return min(fits, key=lambda f: abs(f[0] - cores))[index]
        at_one = low[index] * low[0]  # one core, if all of it were parallel
        serial = 0.0
        a, b = 1 / low[0], 1 / high[0]
        ratio = high[index] / low[index]
        if high[0] > low[0] and abs((1 - b) - ratio * (1 - a)) > 1e-12:
            # t(c) = t1 (s + (1 - s) / c) through both measured points.
            serial = min(max((ratio * a - b) / ((1 - b) - ratio * (1 - a)), 0.0), 1.0)
            at_one = low[index] / (serial + (1 - serial) * a)
        return at_one * (serial + (1 - serial) / max(cores, 1e-9))


def _nearest(factors, tasks: int) -> float:
    """The factor measured at the task count nearest ``tasks`` (the larger
    count on a tie)."""
    return min(factors, key=lambda tf: (abs(tf[0] - tasks), -tf[0]))[1]


@dataclasses.dataclass(frozen=True)
class Link:
    """A path between two tasks: ``latency + bytes / bandwidth`` per message."""

    bandwidth: float  # bytes/s
    latency: float  # s

    def seconds(self, nbytes: float, messages: float = 1) -> float:
        return messages * self.latency + nbytes / self.bandwidth


@dataclasses.dataclass(frozen=True)
class Model:
    """What the modes move and hold, besides compute."""

    parameter_bytes: int  # trainable variables: a dense gradient's bytes too
    sparse_bytes_per_example: float = 0.0  # embedding rows a step's examples touch
    embedding_bytes: int = 0  # of parameter_bytes, in embedding tables
    optimizer_slots: int = 1  # values the optimizer keeps per parameter
    activation_bytes_per_example: float = 0.0  # what the backward pass keeps
    base_memory: int = 0  # a task's resident memory before its model's
    # Pipeline: for K stages, each stage's share of the forward+backward
    # time (as tftrain cuts the model) and the activation bytes per example
    # crossing each cut.
    stages: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where the tasks run. ``local``: all of them on this machine's
    ``cores`` (each task gets its share); otherwise each worker has
    ``cores_per_task`` cores of its own and ``network`` between tasks."""

    workers: int
    cores_per_task: float
    network: Link
    local: bool = True
    cores: int = 0  # the machine's, when local


@dataclasses.dataclass(frozen=True)
class Links:
    """What a step's communication goes through.

    ``ring``: tftrain's TCP ring (bandwidth, latency per hop) plus ``ring_call``
    seconds a step for entering it from the graph; ``grpc``: TensorFlow's
    gRPC (a parameter server's reads and writes, its ring collectives, a
    pipeline's transfers between processes), with ``ps_step`` the fixed
    seconds a parameter-server update costs (dispatch, one read and one
    write of every variable); ``grpc_pack`` the collectives' pack size."""

    ring: Link
    ring_call: float
    grpc: Link
    ps_step: float
    grpc_pack: int = 256 << 10
    # A request and its answer between two processes (a pipeline's stage
    # waits for its input so); the per-message latency is grpc's.
    grpc_round_trip: float = 0.0
    # This machine: (workers, ps) -> seconds per update with that many
    # workers updating at once (the servers share the cores): measured by
    # running the mode at ``local_ps_batch`` examples a step (0: bare
    # updates, no compute). Either way the rule is the same
    # (parameter_server); the batch is kept to say what was measured.
    local_ps: dict = dataclasses.field(default_factory=dict)
    local_ps_batch: int = 0
    # This machine: (workers, ps) -> ((batch, seconds per update), ...), the
    # mode launched here at two batches (one example a step and about half
    # the global batch): its update follows the line through them.
    local_ps_steps: dict = dataclasses.field(default_factory=dict)
    # This machine: (stages, micro-batches) -> ((batch, seconds), ...), steps
    # of model_parallel launched here (its stages' processes sharing the
    # cores) at two batches.
    local_pipeline: dict = dataclasses.field(default_factory=dict)
    # "launched" (between two processes) and "one process" (two logical
    # devices) -> (seconds per pass of a cut's tensor, a step's fixed cost),
    # measured as a pipeline passes them; absent: from the link.
    pipeline_passes: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Prediction:
    mode: str
    flags: list[str]
    launch: dict  # tftrain launch's own flags ({} for one process)
    step_seconds: float
    examples_per_second: float
    bound: str  # compute, all-reduce, ps bandwidth, pipeline bubble, input
    memory_per_task: int
    communication_bound_below_batch: int | None = None
    efficiency: float = 0.0  # examples/s against one_device's
    parts: dict = dataclasses.field(default_factory=dict)


def ring_seconds(nbytes: float, n: int, link: Link, messages_per_hop: int = 1) -> float:
    """A ring all-reduce of ``nbytes`` over ``n`` tasks: 2(N-1) hops, each
    moving a 1/N chunk (Patarasuk & Yuan 2009; Horovod, Sergeev & Del Balso
    2018): 2(N-1)/N x bytes / bandwidth + 2(N-1) x latency."""
    if n <= 1:
        return 0.0
    hops = 2 * (n - 1)
    return hops * messages_per_hop * link.latency + hops / n * nbytes / link.bandwidth


def slope_between(points) -> float:
    """The slope between the lowest and highest of two or more measured
    (batch, seconds) points; never below 0 (noise larger than the batch's
    effect)."""
    (x1, y1), (x2, y2) = min(points), max(points)
    return max((y2 - y1) / (x2 - x1), 0.0)


def line_at(points, x: float) -> float:
    """The line through two measured (batch, seconds) points, at ``x``."""
    x1, y1 = min(points)
    return y1 + (x - x1) * slope_between(points)


def _two_batches(points) -> bool:
    # Two batches, the larger slower: anything else is noise, no line.
    if not points or len(points) < 2:
        return False
    (x1, y1), (x2, y2) = min(points), max(points)
    return x2 > x1 and y2 > y1


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe's idle share (Huang et al. 2019): (K-1)/(M+K-1)."""
    return (stages - 1) / (microbatches + stages - 1)


def _memory(model: Model, batch: float, state_share: float = 1.0) -> int:
    # Weights, gradients and the optimizer's slots, plus what the backward
    # pass keeps for this task's examples.
    state = model.parameter_bytes * (2 + model.optimizer_slots) * state_share
    return int(model.base_memory + state + model.activation_bytes_per_example * batch)


def _cores(cluster: Cluster, tasks_here: int) -> float:
    if cluster.local:
        return max(cluster.cores / max(tasks_here, 1), 1e-3)
    return cluster.cores_per_task


def _finish(p: Prediction, batch: int, input_rate: float | None) -> Prediction:
    p.examples_per_second = batch / p.step_seconds
    if input_rate and input_rate < p.examples_per_second:
        p.examples_per_second = input_rate
        p.step_seconds = batch / input_rate
        p.bound = "input"
    return p


def one_device(model: Model, compute: Compute, batch: int, cluster: Cluster, input_rate=None):
    cores = cluster.cores if cluster.local else cluster.cores_per_task
    t = compute.seconds(batch, cores)
    p = Prediction(
        "one_device", ["--strategy=one_device"], {}, t, 0, "compute", _memory(model, batch)
    )
    p.parts = {"compute": t}
    return _finish(p, batch, input_rate)


def mirrored(model, compute, batch, cluster, replicas: int, input_rate=None):
    """``replicas`` devices in one process; on CPU they are logical devices
    sharing the cores, each replica with its share, side by side; the
    all-reduce is in memory (its cost: one pass over the gradients each)."""
    cores = (cluster.cores if cluster.local else cluster.cores_per_task) / replicas
    t_compute = compute.seconds(batch / replicas, cores) * compute.replicated(replicas)
    t_reduce = replicas * model.parameter_bytes / 10e9  # memory bandwidth, order of magnitude
    p = Prediction(
        f"mirrored x{replicas}",
        ["--strategy=mirrored", f"--num_replicas={replicas}"],
        {},
        t_compute + t_reduce,
        0,
        "compute",
        _memory(model, batch),
    )
    p.parts = {"compute": t_compute, "all-reduce": t_reduce}
    return _finish(p, batch, input_rate)


def multi_worker(model, compute, batch, cluster, links: Links, collective: str, input_rate=None):
    """N workers, each computing B/N and then summing the gradients: the
    step is compute + all-reduce (tftrain's ring waits for the whole
    gradient; no overlap is assumed)."""
    n = cluster.workers
    cores = _cores(cluster, n)
    per_worker = batch / n
    t_compute = compute.seconds(per_worker, cores) * compute.replicated(n, cluster.local)
    g = model.parameter_bytes
    if collective == "tcp":
        link = _slower(links.ring, cluster)
        t_reduce = ring_seconds(g, n, link) + (links.ring_call if n > 1 else 0.0)
        name, flags = "multi_worker_mirrored (tcp ring)", ["--collective=tcp"]
    else:
        link = _slower(links.grpc, cluster)
        packs = max(math.ceil(g / links.grpc_pack), 1)
        t_reduce = ring_seconds(g, n, link, messages_per_hop=packs)
        name, flags = "multi_worker_mirrored (grpc)", ["--collective=grpc"]
    p = Prediction(
        f"{name} x{n}",
        ["--strategy=multi_worker_mirrored", *flags],
        {"num_workers": n},
        t_compute + t_reduce,
        0,
        "all-reduce" if t_reduce > t_compute else "compute",
        _memory(model, per_worker),
    )
    p.parts = {"compute": t_compute, "all-reduce": t_reduce}
    # Below this global batch the all-reduce takes longer than the compute.
    fixed = compute.seconds(0, cores)
    slope = compute.seconds(1, cores) - fixed
    if n > 1 and slope > 0:
        p.communication_bound_below_batch = max(int(math.ceil(n * (t_reduce - fixed) / slope)), 0)
    return _finish(p, batch, input_rate)


def _slower(link: Link, cluster: Cluster) -> Link:
    """The link a local measurement gives, limited by the cluster's network."""
    if cluster.local:
        return link
    net = cluster.network
    return Link(min(link.bandwidth, net.bandwidth), max(link.latency, net.latency))


def parameter_server(model, compute, batch, cluster, links: Links, ps: int, input_rate=None):
    """Asynchronous SGD: each worker reads the variables, computes a step of
    the global batch and writes its update, on its own. A worker's step:
    compute + the fixed cost of an update + its bytes both ways (dense
    variables whole, embedding tables only the rows its examples touch),
    spread over ``ps`` servers; each server's link carries every worker's
    share, which bounds the updates a second (Dean et al. 2012; Li et al.
    2014)."""
    w = cluster.workers
    # Locally the chief and the parameter servers are tasks too, but they
    # mostly wait: the workers get the cores.
    cores = _cores(cluster, w)
    dense = model.parameter_bytes - model.embedding_bytes
    sparse = min(model.sparse_bytes_per_example * batch, model.embedding_bytes)
    moved = 2 * (dense + sparse)  # read and write
    link = _slower(links.grpc, cluster)
    t_compute = compute.seconds(batch, cores)
    shared = links.local_ps.get((w, ps)) if cluster.local else None
    ran = links.local_ps_steps.get((w, ps)) if cluster.local else None
    ps_rate = math.inf
    line = None
    if _two_batches(ran):
        # One machine, the mode launched at two batches: the servers', the
        # chief's and the workers' work sharing the cores, all measured so.
        # The line's slope is the examples' share of an update, its height
        # at batch 0 what an update costs whatever its batch. A sum of
        # parts measured apart (below) under-counted what the ResNet's
        # workers lose to the servers on 2 cores: it over-predicted their
        # examples/s by 15-34% (BUILD_NOTES.md, round seven).
        slope = slope_between(ran)
        step = line_at(ran, batch)
        # What an update costs at batch 0, less the workers' own fixed cost
        # of a step (W of them at once): the servers' traffic and the run's
        # bookkeeping.
        own = compute.seconds(0, cores) * compute.crowded(w) / w
        fixed_update = min(max(line_at(ran, 0) - own, 0.0), step)
        # A worker's step (W updates' time), as the other rows' parts say it.
        t_comm, t_compute = fixed_update * w, (step - fixed_update) * w
        updates = 1 / step
        line = (min(ran), max(ran))
    elif shared is not None:
        # One machine: the servers, the chief and the workers share its
        # cores. The mode itself is measured so at one example a step
        # (seconds per update, T: the traffic, dispatch and bookkeeping of
        # the W workers updating at once; or, from an earlier version, bare
        # updates); the workers compute side by side, each on its share of
        # the cores and crowded as measured, so W steps take one such step:
        # an update costs T + t(B, C/W) x crowding / W. T's one example is
        # counted twice: the fitted line's t(1) is no estimate of it (the
        # ResNet's, through batches 64 and 128, puts 0.10 s at batch 0), and
        # leaving it out over-predicted the ResNet by 46-59%
        # (BUILD_NOTES.md, round six).
        t_compute *= compute.crowded(w)
        t_comm = shared * w  # a worker's step holds W updates
        updates = 1 / (shared + t_compute / w)
    else:
        t_comm = links.ps_step + link.seconds(moved / ps, 0)
        # What the servers' links allow: every update crosses them once.
        ps_rate = ps * link.bandwidth / max(moved, 1)
        updates = min(w / (t_compute + t_comm), ps_rate)
    bound = (
        "ps bandwidth"
        if ps_rate <= updates * 1.0001
        else ("ps traffic" if t_comm > t_compute else "compute")
    )
    p = Prediction(
        f"parameter_server {w} workers, {ps} ps",
        ["--strategy=parameter_server"],
        {"num_workers": w, "num_ps": ps},
        1 / updates,
        0,
        bound,
        _memory(model, batch),
    )
    p.parts = {"compute": t_compute, "ps traffic": t_comm, "updates/s": updates}
    # Below this batch the traffic takes longer than the compute, both as a
    # worker's step (W updates on one machine, one elsewhere).
    if line is not None:
        p.parts["measured updates (batch, seconds)"] = line
        fixed, slope = own * w, slope * w
    else:
        crowd = compute.crowded(w) if shared is not None else 1.0
        fixed = compute.seconds(0, cores) * crowd
        slope = compute.seconds(1, cores) * crowd - fixed
    if slope > 0:
        p.communication_bound_below_batch = max(int(math.ceil((t_comm - fixed) / slope)), 0)
    return _finish(p, batch, input_rate)


def model_parallel(
    model,
    compute,
    batch,
    cluster,
    links: Links,
    stages: int,
    microbatches: int,
    processes: bool,
    input_rate=None,
):
    """A GPipe pipeline: K stages, M micro-batches. The step is (M+K-1) slots
    of the slowest stage's micro-batch (its share of the layers' time at
    B/M, and of the step's fixed cost), plus each cut's activations and
    their gradients for each micro-batch, over gRPC between processes (in
    memory within one).

    Stages in one process on this machine's CPU (logical devices) share its
    cores: no stage has hardware of its own, so the step also takes at least
    all of its work done on all the cores: the schedule's own cost (measured
    at one example per micro-batch, or else the fixed cost once per
    micro-batch) and the examples' compute."""
    # A model whose cut was not measured: equal stages, nothing crossing.
    parts, crossing = model.stages.get(stages, ((1 / stages,) * stages, (0.0,) * (stages - 1)))
    k = len(parts)
    shared = cluster.local and not processes
    cores = cluster.cores if shared else _cores(cluster, k)
    mb = batch / microbatches
    fixed = compute.seconds(0, cores)
    per_example = compute.seconds(1, cores) - fixed
    each = compute.microbatch_seconds(cores)
    # A stage's micro-batch: its share of the layers' work and of what a
    # micro-batch costs whatever its size; once a step, the update's fixed
    # cost, split between the stages.
    slot = max(each * share + mb * per_example * share for share in parts)
    if processes and cluster.local:
        slot *= compute.crowded(k)  # the stages' processes compute at once on one machine
    once = max(fixed - each, 0.0) / k
    transfer = 0.0
    passes = links.pipeline_passes.get("launched" if processes else "one process")
    if passes is not None:
        # Measured at this cut's size: per cut and slot, the activations
        # forward and their gradients back; a cluster's slower network
        # bounds each pass from below.
        per_pass, fixed_passes = passes
        net = cluster.network if processes and not cluster.local else None
        for per_example_bytes in crossing:
            each_pass = per_pass
            if net is not None:
                each_pass = max(per_pass, net.seconds(per_example_bytes * mb))
            transfer += 2 * each_pass
        once += fixed_passes
    elif processes:
        link = _slower(links.grpc, cluster)
        wait = max(links.grpc_round_trip, 2 * link.latency)
        for per_example_bytes in crossing:
            # Activations forward, their gradients back, each received on
            # request.
            transfer += wait + 2 * per_example_bytes * mb / link.bandwidth
    t = (microbatches + k - 1) * (slot + transfer) + once
    bubble = bubble_fraction(k, microbatches)
    bound = "pipeline bubble" if bubble * t > transfer * (microbatches + k - 1) else "activations"
    work = fixed + (microbatches - 1) * each + batch * per_example
    schedule = {(k_, m_): t_ for k_, m_, t_ in compute.pipeline_steps}.get((k, microbatches))
    if schedule is not None:
        # The stages' schedule, passes and updates, measured at one example
        # per micro-batch, and the rest of the examples' compute, at what
        # an example cost the same schedule at a larger batch (the stages'
        # small micro-batches on devices that share the cores: 1.5-2x
        # one_device's cost per example for the MLP); never below the same
        # work on one device (the probes are noisy).
        per = per_example
        larger = {(k_, m_): (b_, t_) for k_, m_, b_, t_ in compute.pipeline_batches}
        b_, t_ = larger.get((k, microbatches), (0, 0.0))
        if b_ > microbatches:
            per = slope_between(((microbatches, schedule), (b_, t_)))
        work = max(work, schedule + (batch - microbatches) * per)
    if shared and work > t:
        t, bound = work, "compute"
    ran = links.local_pipeline.get((k, microbatches)) if processes and cluster.local else None
    line = None
    if _two_batches(ran):
        # Launched on this machine at two batches: the stages' processes
        # share its cores, so their passes, dispatch and compute are
        # measured so and the step follows the line through them
        # (BUILD_NOTES.md: a model of passes timed alone missed by 37%).
        # The bound stays the parts' reading of what dominates.
        line = (min(ran), max(ran))
        t = line_at(ran, batch)
    where = "launched" if processes else "one process"
    p = Prediction(
        f"model_parallel {k} stages, {microbatches} micro-batches ({where})",
        ["--strategy=model_parallel", f"--num_microbatches={microbatches}"]
        + ([] if processes else [f"--num_stages={k}"]),
        {"num_workers": k} if processes else {},
        t,
        0,
        bound,
        _memory(model, mb * (microbatches + k - 1), state_share=1 / k),
    )
    p.parts = {"slot": slot, "transfer": transfer, "bubble": bubble}
    if line is not None:
        p.parts["measured steps (batch, seconds)"] = line
    return _finish(p, batch, input_rate)

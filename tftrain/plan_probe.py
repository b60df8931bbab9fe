"""The measurements behind ``tftrain plan``, each in a process of its own
(TensorFlow's thread pools are sized once per process).

    python -m tftrain.plan_probe compute REQUEST.json RESULT.json
    python -m tftrain.plan_probe ring RANK PORT0 PORT1 NBYTES... (no TensorFlow)
    python -m tftrain.plan_probe grpc REQUEST.json RESULT.json
    python -m tftrain.plan_probe hops REQUEST.json RESULT.json
    python -m tftrain.plan_probe pipeline REQUEST.json RESULT.json

``compute``: steps of the real trainer (``tftrain.train``, one device) at
each batch of the request, on this process's threads; the model's bytes,
layers and cuts. ``grpc``: updates of variables shaped like the model's on
a parameter server through a ``ClusterCoordinator``, as parameter-server
training makes them, and a tensor passed to a worker and back as a launched
pipeline passes it. ``hops``: the same between two logical devices of one
process. ``pipeline``: model_parallel in one process at one example per
micro-batch. ``ring``: tftrain's TCP ring on NumPy buffers.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time

from tftrain import actions, resources

SLOTS = {"sgd": 0, "momentum": 1, "adagrad": 1, "adam": 2, "rmsprop": 2}


def _config(train_argv):
    from tftrain.distribute import launch

    return launch.config_of_train_argv(train_argv)


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _steps_per_second(
    config, batch: int, target: float, microbatches: int = 1, ready=None, repeats=1, **mode
) -> float:
    """Training steps a second at ``batch`` (in ``microbatches`` micro-batches):
    steady state (tftrain leaves the first loop, which traces, out of
    examples/s); the median of ``repeats`` timed runs of about ``target``
    seconds each. ``ready`` is called once in each timed run, after that
    first loop: tasks measured side by side wait there for each other, so
    that their timed steps overlap whatever each took to build and trace.
    Alone or side by side, the runs make the same calls (one action, no
    others)."""
    ready = ready or (lambda: None)

    def run(loop: int, loops: int, call=lambda: None) -> float:
        return _train(config, batch, microbatches, loop * loops, loop, [_Once(loop, call)], **mode)

    rough = run(2, 2)
    loop = int(min(max(round(0.5 * rough), 2), config.steps_per_loop or 100))
    loops = 1 + max(math.ceil(target * rough / loop), 1)
    return statistics.median(run(loop, loops, ready) for _ in range(max(repeats, 1)))


def _train(config, batch, microbatches, steps, loop, train_actions, **mode) -> float:
    """Steps a second of a short ``tftrain.train`` run in a temporary folder,
    with ``train_actions`` in place of the default ones."""
    from tftrain import api

    with tempfile.TemporaryDirectory() as model_dir:
        result = api.run(
            config.replace(
                **(mode or {"strategy": "one_device"}),
                batch_size=batch,
                num_microbatches=microbatches,
                train_steps=steps,
                steps_per_loop=loop,
                eval_interval=10**9,
                checkpoint_interval=10**9,
                max_eval_examples=config.eval_batch_size or batch,
                log_interval_secs=10**6,
                export=False,
                model_dir=model_dir,
            ),
            log=lambda _: None,
            train_actions=train_actions,
        )
    return result["examples_per_second"] / batch


class _Once(actions.Action):
    """A train action that calls ``call`` once, after the first stretch of
    ``interval`` steps (and then never ends a stretch early)."""

    def __init__(self, interval: int, call):
        self.interval, self.call = interval, call

    def steps_until_due(self, step: int) -> int | None:
        return None if self.call is None else super().steps_until_due(step)

    def due(self, step: int, last: bool) -> bool:
        return self.call is not None and step >= self.interval

    def __call__(self, output) -> None:
        call, self.call = self.call, None
        call()


def _wait_for_file(path: str, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} in {timeout:.0f} s")
        time.sleep(0.01)


class _Meet(actions.Action):
    """A train action after every step that meets the other task measured
    side by side (a byte each way over loopback), as a synchronous step
    meets the others in its all-reduce; it times the steps between its
    first meeting and its last, the waits included. ``name``: this
    meeting's, unique in ``folder``."""

    interval = 1

    def __init__(self, folder: str | None = None, rank: int = 0, tasks: int = 1, name="meet"):
        if folder is not None and tasks != 2:
            raise ValueError(f"tasks in lockstep: expected 2, got {tasks}")
        self.folder, self.rank, self.name, self.peer = folder, rank, name, None
        self.times = []

    def begin(self, step: int) -> None:
        import socket

        if self.folder is None:
            return
        path = os.path.join(self.folder, f"{self.name}-port")
        if self.rank == 0:
            with socket.create_server(("127.0.0.1", 0)) as server:
                server.settimeout(300)
                with open(path + ".tmp", "w") as f:
                    f.write(str(server.getsockname()[1]))
                os.replace(path + ".tmp", path)
                self.peer, _ = server.accept()
        else:
            _wait_for_file(path, "the other task measured in lockstep never came")
            with open(path) as f:
                self.peer = socket.create_connection(("127.0.0.1", int(f.read())), timeout=300)
        self.peer.settimeout(300)

    def __call__(self, output) -> None:
        if self.peer is not None:
            try:
                self.peer.sendall(b"x")
                answered = self.peer.recv(1)
            except OSError as e:
                raise RuntimeError(f"the other task measured in lockstep left early ({e})") from e
            if not answered:
                raise RuntimeError("the other task measured in lockstep left early")
        self.times.append(time.perf_counter())

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()

    def steps_per_second(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _lockstep_steps_per_second(config, batch: int, steps: int, together=None, **mode) -> float:
    """Steps a second of ``steps`` steps that each end by meeting the other
    task (``together``; alone: the same stretches of one step, no one to meet)."""
    meet = _Meet(**(together or {}), name=f"meet-{batch}")
    try:
        _train(config, batch, 1, steps + 1, 1, [meet], **mode)
    finally:
        meet.close()
    return meet.steps_per_second()


def _barrier(folder: str, rank: int, tasks: int, timeout: float = 300.0):
    """Tasks measured side by side start their timed steps together: each
    marks itself ready in ``folder`` and waits for the others (bounded).
    Each call is a meeting of its own (its files are numbered)."""
    calls = []

    def ready():
        calls.append(None)
        mark = os.path.join(folder, f"ready-{len(calls)}-{{}}")
        open(mark.format(rank), "w").close()
        for i in range(tasks):
            _wait_for_file(
                mark.format(i), "the other tasks measured side by side never got ready", timeout
            )

    return ready


def _bytes(variable) -> int:
    import numpy as np

    return math.prod(variable.shape) * np.dtype(variable.dtype).itemsize


def _input_rate(config, seconds: float = 1.0) -> float:
    """Examples a second the task's training stream gives, read alone."""
    from tftrain import inputs
    from tftrain.tasks import from_config

    stream = iter(inputs.stream(from_config(config), config, training=True)())
    for _ in range(3):  # start-up: the first batches fill the prefetch
        next(stream)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(stream)
        count += 1
    return count * config.batch_size / (time.perf_counter() - start)


def _ring_call_seconds(shapes) -> float:
    """What entering tftrain's ring from the graph costs a step, the network
    aside: the gradients through ``tf.numpy_function`` and copied once (a
    ring of one)."""
    import tensorflow as tf

    from tftrain import pipeline
    from tftrain.distribute.ring import RingAllReduce

    alone = RingAllReduce(0, 1, timeout=10)
    gradients = [tf.ones(s) for s in shapes]
    return pipeline.median_call_seconds(tf.function(lambda: alone.reduce_in_graph(gradients)), 21)


def _model_profile(config, stages: list[int], microbatches: dict) -> dict:
    import keras

    from tftrain import _internal, pipeline
    from tftrain.tasks import call_user, from_config

    task = from_config(config)
    model = call_user("build_model", task.build_model, config)
    if not model.built or not model.trainable_variables:
        # A subclassed model makes its variables when first called.
        from tftrain import inputs

        features = inputs.first_batch(task, config)[0]
        call_user(f"{type(model).__name__}.call", model, features)
    variables = model.trainable_variables
    parameter_bytes = sum(_bytes(v) for v in variables)
    embedding_bytes, sparse = 0, 0.0
    activations = 0.0
    for layer in _internal.all_layers(model):
        if isinstance(layer, keras.layers.Embedding):
            embedding_bytes += sum(_bytes(v) for v in layer.trainable_variables)
            rows = (
                math.prod(d or 1 for d in layer.input.shape[1:]) if hasattr(layer, "input") else 1
            )
            sparse += rows * layer.output_dim * 4
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if (
            isinstance(shape, (list, tuple))
            and shape
            and not isinstance(shape[0], (int, type(None)))
        ):
            continue
        activations += 4 * math.prod(d or 1 for d in shape[1:])
    cuts, uncut = {}, None
    try:
        layers = pipeline.segments(model)
    except Exception as e:  # noqa: BLE001 - a model that cannot be cut: no pipeline rows
        layers, uncut = [], str(e).splitlines()[0] if str(e) else type(e).__name__
    for k in stages:
        if len(layers) < k:
            continue
        micro = max(config.batch_size // microbatches[str(k)], 1)
        kind, costs = pipeline.layer_costs(
            layers, model.inputs[0].shape[1:], model.inputs[0].dtype, micro, "time"
        )
        bounds = pipeline.partition(costs, k, holds=[bool(la.weights) for la in layers])
        total = sum(costs)
        shares = [sum(costs[a:b]) / total for a, b in zip(bounds, bounds[1:])]
        crossing = []
        for b in bounds[1:-1]:
            out = layers[b - 1].output
            crossing.append(4 * math.prod(d or 1 for d in out.shape[1:]))
        cuts[str(k)] = {"shares": shares, "cut_bytes_per_example": crossing, "balance": kind}
    if uncut is None and any(len(layers) < k for k in stages):
        uncut = f"{model.name} can be cut into at most {len(layers)} piece(s)"
    return {
        "cannot_cut": uncut,
        "ring_call_seconds": _ring_call_seconds([list(v.shape) for v in variables]),
        "parameter_bytes": int(parameter_bytes),
        "variable_shapes": [list(v.shape) for v in variables],
        "embedding_bytes": int(embedding_bytes),
        "sparse_bytes_per_example": sparse,
        "activation_bytes_per_example": 2 * activations,  # outputs and their gradients
        "optimizer_slots": SLOTS.get(config.optimizer, 1),
        "stages": cuts,
    }


def compute(request: dict) -> dict:
    config = _config(request["train_argv"])
    # Tasks measured side by side get the thread settings a launched task has.
    config = config.replace(
        intra_op_threads=request["threads"],
        inter_op_threads=request.get("inter_op_threads", 0),
        thread_spinning=request.get("thread_spinning", config.thread_spinning),
    )
    base = _rss()
    result = {"threads": request["threads"], "steps_per_second": {}}
    together = request.get("together")  # {"folder", "rank", "tasks"}: side by side
    ready = _barrier(**together) if together else None
    # The strategy's flags (default one_device): {"strategy": "mirrored",
    # "num_replicas": 1} is a data-parallel replica's step, alone.
    mode = request.get("mode") or {}
    for batch in request["batches"]:
        if request.get("lockstep"):  # steps that meet the other task's (benchmarks.crowding)
            rate = _lockstep_steps_per_second(config, batch, request["lockstep"], together, **mode)
        else:
            rate = _steps_per_second(
                config,
                batch,
                request.get("seconds", 2.0),
                ready=ready,
                repeats=request.get("repeats", 1),
                **mode,
            )
        result["steps_per_second"][str(batch)] = rate
    # The global batch in micro-batches, as a pipeline would split it.
    result["microbatched_steps_per_second"] = {
        str(m): _steps_per_second(
            config,
            config.batch_size,
            request.get("seconds", 2.0),
            m,
            repeats=request.get("repeats", 1),
        )
        for m in sorted(set(request.get("microbatches", {}).values()))
        if m > 1
    }
    if request.get("profile"):
        result["model"] = _model_profile(config, request["stages"], request["microbatches"])
        result["input_examples_per_second"] = _input_rate(config)
    result["base_memory"] = base
    result["peak_memory"] = _rss()
    return result


def ring(rank: int, ports: list[int], sizes: list[int]) -> None:
    import numpy as np

    from tftrain.distribute.ring import loopback_pair

    r = loopback_pair(rank, ports)
    timings = {}
    for size in sizes:
        values = np.ones(max(size // 4, 1), np.float32)
        for _ in range(10):
            r.all_reduce(values)
        repeats = max(20, min(2000, int(0.5e9 / max(size, 1))))
        start = time.perf_counter()
        for _ in range(repeats):
            r.all_reduce(values)
        timings[str(size)] = (time.perf_counter() - start) / repeats
    if rank == 0:
        print(json.dumps(timings), flush=True)


def _update_of(strategy, variables, optimizer):
    import tensorflow as tf

    def step():
        gradients = [v.read_value() * 0.0 + 1e-3 for v in variables]
        optimizer.apply_gradients(zip(gradients, variables))

    @tf.function
    def update(steps):
        # As tftrain's parameter-server loop: one scheduled function runs a
        # loop of steps; each reads every variable and applies the run's
        # optimizer to a gradient of each (the servers hold its slots).
        for _ in tf.range(steps):
            strategy.run(step)
        return tf.constant(0)

    return update


def grpc(request: dict) -> dict:
    """Seconds per parameter-server update of variables of ``shapes`` (and of
    as many one-value variables), with the cluster's workers updating at
    once, and one round trip to a server: the chief here, the workers and
    servers of the request's TF_CONFIG."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    workers = len(resolver.cluster_spec().as_dict()["worker"])
    timings = {}
    from tftrain import optimizers, pipeline

    config = _config(request["train_argv"])
    for name, shapes in (("full", request["shapes"]), ("tiny", [[1]] * len(request["shapes"]))):
        with strategy.scope():
            variables = [tf.Variable(tf.zeros(s)) for s in shapes]
            optimizer = optimizers.from_config(config, 100, 10**6)
            optimizer.build(variables)

        update = _update_of(strategy, variables, optimizer)

        loop = tf.constant(request.get("steps_per_loop", 10), tf.int64)
        for _ in range(2 * workers):
            coordinator.schedule(update, args=(loop,))
        coordinator.join()
        repeats = request.get("repeats", 10) * workers
        start = time.perf_counter()
        for _ in range(repeats):
            coordinator.schedule(update, args=(loop,))
        coordinator.join()
        timings[name] = (time.perf_counter() - start) / repeats / int(loop)
    with strategy.scope():
        one = tf.Variable([0.0])
    timings["round_trip"] = pipeline.median_call_seconds(lambda: one.read_value().numpy(), 100)
    if request.get("pass_bytes") is not None:
        # Passes between this process and a worker's, as a launched
        # pipeline's stages pass a cut's tensors.
        timings["passes"] = hop_seconds(
            [
                "/job:chief/replica:0/task:0/device:CPU:0",
                "/job:worker/replica:0/task:0/device:CPU:0",
            ],
            request["pass_bytes"],
        )
    return timings


def pipeline(request: dict) -> dict:
    """Seconds a step of ``model_parallel`` in this process (its stages on
    logical devices) at one example per micro-batch (what the schedule
    itself costs a step, beside the examples' compute) and at ``batch``."""
    config = _config(request["train_argv"])
    m = request["microbatches"]
    mode = {"strategy": "model_parallel", "num_stages": request["stages"]}
    result = {"step_seconds": 1 / _steps_per_second(config, m, 4.0, m, **mode)}
    if request.get("batch"):
        # And at a larger batch: what an example costs the same schedule.
        result["batch_step_seconds"] = 1 / _steps_per_second(
            config, request["batch"], 4.0, m, **mode
        )
    return result


def hop_seconds(devices: list[str], nbytes: int, long: int = 20) -> dict:
    """A tensor of ``nbytes`` passed back and forth between two devices, as
    a pipeline passes a cut's activations and gradients: the seconds each
    pass adds to a step, and a step's fixed cost (fitted from chains of 2
    and ``long`` passes inside one function)."""
    import tensorflow as tf

    from tftrain import pipeline

    x = tf.ones([max(int(nbytes) // 4, 1)])

    def chain(n):
        @tf.function
        def passes(x):
            for i in range(n):
                with tf.device(devices[i % 2]):
                    x = x * 1.000001  # an op on each side; nothing to optimise away
            return x

        return lambda: passes(x).numpy()

    seconds = {n: pipeline.median_call_seconds(chain(n), 31) for n in (2, long)}
    per = max((seconds[long] - seconds[2]) / (long - 2), 0.0)
    return {"per_pass": per, "fixed": max(seconds[2] - 2 * per, 0.0)}


def hops(request: dict) -> dict:
    """Passes between two logical CPU devices of one process (a pipeline's
    stages in one process)."""
    from tftrain import resources

    return hop_seconds(resources.local_devices(2, "--num_stages"), request["nbytes"])


def main(argv: list[str]) -> None:
    kind = argv[1]
    resources.prepare_memory()  # as a tftrain process allocates
    if kind == "ring":
        rank, ports, sizes = int(argv[2]), [int(argv[3]), int(argv[4])], [int(a) for a in argv[5:]]
        ring(rank, ports, sizes)
        return
    with open(argv[2]) as f:
        request = json.load(f)
    if request.get("cores"):
        # Pinned before TensorFlow starts, so that every thread it makes (the
        # input pipeline's too) stays on the task's cores, as a launched
        # task's does.
        resources.pin(0, request["cores"])
    result = {"compute": compute, "grpc": grpc, "hops": hops, "pipeline": pipeline}[kind](request)
    with open(argv[3], "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # TensorFlow's server threads never end on their own


if __name__ == "__main__":
    main(sys.argv)

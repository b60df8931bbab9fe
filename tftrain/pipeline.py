"""Pipeline model parallelism: a model's layers cut into stages on their own
devices, a batch cut into micro-batches that flow through them.

Three parts, each usable alone:

- **Schedules** (:func:`schedule`): the order in which each stage runs the
  forward (``F``) and backward (``B``) pass of each micro-batch. ``gpipe``
  (Huang et al. 2019) runs every forward, then every backward: each stage
  holds the activations of all M micro-batches. ``1f1b`` (PipeDream-Flush,
  Narayanan et al. 2021) starts backward passes as soon as the last stage
  can: stage k holds at most K - k micro-batches' activations.
- **Partition** (:func:`segments`, :func:`partition`, :func:`layer_costs`):
  the model cut where one tensor crosses (between layers of a chain, between
  residual or Transformer blocks), consecutive pieces per stage, balanced by
  each piece's measured forward+backward time (or its parameter count).
- **The step** (:class:`PipelineTrainer`): one ``tf.function`` graph in
  which each stage's ops are placed on its device and ordered by the
  schedule with control dependencies; the dataflow executor then runs the
  stages at the same time on different micro-batches. Gradients are summed
  over micro-batches in micro-batch order, whatever the schedule, and applied
  once: one step equals the unsplit model's step on the whole batch up to the
  order of that sum (and equals ``--num_microbatches=M`` on one device).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

from tftrain.errors import ConfigError
from tftrain.trainer import Trainer, _accumulate, gradient_tensor, split_batch

SCHEDULES = ("gpipe", "1f1b")
BALANCES = ("time", "params")

# -- schedules ----------------------------------------------------------------


def schedule(kind: str, num_stages: int, num_microbatches: int) -> list[list[tuple[str, int]]]:
    """Each stage's actions, in order: ``("F", j)`` or ``("B", j)`` for micro-batch j."""
    K, M = num_stages, num_microbatches
    stages = []
    for k in range(K):
        if kind == "gpipe":
            stages.append([("F", j) for j in range(M)] + [("B", j) for j in range(M)])
            continue
        if kind != "1f1b":
            raise ValueError(f"pipeline schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")
        warmup = min(K - k - 1, M)
        actions = [("F", j) for j in range(warmup)]
        for j in range(M - warmup):
            actions += [("F", warmup + j), ("B", j)]
        actions += [("B", j) for j in range(M - warmup, M)]
        stages.append(actions)
    return stages


def construction_order(stages: list[list[tuple[str, int]]]) -> list[tuple[str, int, int]]:
    """All actions as ``(kind, stage, micro-batch)``, each after the actions it
    needs: a stage's previous action, the forward of the stage before, the
    backward of the stage after."""
    K = len(stages)
    position = [0] * K
    done: set[tuple[str, int, int]] = set()
    order = []
    while any(position[k] < len(stages[k]) for k in range(K)):
        progressed = False
        for k in range(K):
            if position[k] == len(stages[k]):
                continue
            kind, j = stages[k][position[k]]
            needs = [("F", k, j)] if kind == "B" else []
            if kind == "F" and k > 0:
                needs.append(("F", k - 1, j))
            if kind == "B" and k < K - 1:
                needs.append(("B", k + 1, j))
            if all(n in done for n in needs):
                done.add((kind, k, j))
                order.append((kind, k, j))
                position[k] += 1
                progressed = True
        if not progressed:
            raise ValueError("the pipeline schedule deadlocks")
    return order


def peak_in_flight(actions: list[tuple[str, int]]) -> int:
    """The most micro-batches whose activations a stage holds at once."""
    held = peak = 0
    for kind, _ in actions:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """The idle share of a synchronous pipeline's step: (K - 1) / (M + K - 1)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


# -- partition ----------------------------------------------------------------


def segments(model) -> list:
    """The pieces the model can be cut into, in order: the points of its
    graph where a single tensor crosses from what came before to what comes
    after. A piece is a layer (in a chain, every layer is one), or, where a
    piece holds a branch and its join (a residual block, a Transformer
    block), a Keras model of that part of the graph sharing its layers.

    Raises:
      ConfigError: for a model without a known graph (a subclassed model),
        with several inputs or outputs, or a layer called more than once.
    """
    import keras

    name = getattr(model, "name", type(model).__name__)
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ConfigError(
            f"--strategy=model_parallel cuts Sequential and functional models; {name} is a "
            "subclassed model, whose graph is not known before it runs: build it with "
            "keras.Input (functional) to cut it into stages."
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(
            f"--strategy=model_parallel: {name} has {len(inputs)} input(s) and "
            f"{len(outputs)} output(s); a pipeline cuts models with one of each."
        )
    layers = [la for la in model.layers if not isinstance(la, keras.layers.InputLayer)]
    produced = {id(inputs[0]): (-1, inputs[0])}
    last_use = {id(outputs[0]): len(layers)}
    for i, layer in enumerate(layers):
        try:
            taken, given = keras.tree.flatten(layer.input), keras.tree.flatten(layer.output)
        except (AttributeError, ValueError):
            raise ConfigError(
                f"--strategy=model_parallel: {name}'s layer {layer.name!r} is used more than "
                "once in the model (a shared layer), so the model cannot be cut around it."
            ) from None
        for t in taken:
            last_use[id(t)] = max(last_use.get(id(t), -1), i)
        for t in given:
            produced[id(t)] = (i, t)
    # A tensor no layer's ``output`` names comes from a second call of a layer.
    for layer in layers:
        for t in keras.tree.flatten(layer.input):
            if id(t) not in produced:
                raise ConfigError(
                    f"--strategy=model_parallel: {name}'s layer {layer.name!r} takes the output "
                    "of a layer used more than once in the model (a shared layer), so the "
                    "model cannot be cut around it."
                )
    if id(outputs[0]) not in produced:
        raise ConfigError(
            f"--strategy=model_parallel: {name}'s output comes from a layer used more than "
            "once in the model (a shared layer), so the model cannot be cut around it."
        )
    cuts = [(-1, inputs[0])]
    for i in range(len(layers) - 1):
        live = [t for key, (at, t) in produced.items() if at <= i < last_use.get(key, -1)]
        if len(live) == 1:
            cuts.append((i, live[0]))
    cuts.append((len(layers) - 1, outputs[0]))
    pieces = []
    for (a, before), (b, after) in zip(cuts, cuts[1:]):
        chunk = layers[a + 1 : b + 1]
        if len(chunk) == 1 and keras.tree.flatten(chunk[0].input) == [before]:
            pieces.append(chunk[0])
        else:
            pieces.append(keras.Model(before, after, name=f"{chunk[0].name}_to_{chunk[-1].name}"))
    return pieces


def partition(
    costs: Sequence[float], num_stages: int, holds: Sequence[bool] | None = None
) -> list[int]:
    """Stage boundaries ``[0, b1, ..., n]`` of consecutive items, each stage
    non-empty, minimising the largest stage's total cost (ties: earlier cuts).

    ``holds``: which items hold variables. Where a cut exists in which every
    stage holds some, only such cuts are taken: a stage with nothing to
    train (a rescaling and a reshape, cheap or not as the machine's load
    has it) would make a pipeline that only passes activations on."""
    n, K = len(costs), num_stages
    if not 1 <= K <= n:
        raise ValueError(f"cannot cut {n} layers into {K} stages")
    if holds is not None:
        held = [0]
        for h in holds:
            held.append(held[-1] + bool(h))
        cut = _partition(costs, K, lambda j, i: held[i] > held[j])
        if cut is not None:
            return cut
    return _partition(costs, K, lambda j, i: True)


def _partition(costs, K, allowed) -> list[int] | None:
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest-stage cost of the first i items in k stages.
    best = [[inf] * (n + 1) for _ in range(K + 1)]
    cut = [[0] * (n + 1) for _ in range(K + 1)]
    best[0][0] = 0.0
    for k in range(1, K + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or not allowed(j, i):
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    if best[K][n] == inf:
        return None
    bounds, i = [n], n
    for k in range(K, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def _activation_shape(layer) -> tuple[int, ...]:
    return tuple(int(d) for d in layer.output.shape[1:])


def layer_costs(layers, input_shape, input_dtype, batch: int, balance: str):
    """Each layer's cost, and what it was: ``("time", seconds per
    forward+backward of one micro-batch)`` or ``("params", parameter count)``.

    Timing that fails (a layer that cannot run alone) falls back to
    parameter counts, and says so in the returned kind.
    """
    if balance == "time":
        try:
            return "time", [
                _time_layer(la, shape, batch)
                for la, shape in _inputs_of(layers, input_shape, input_dtype)
            ]
        except Exception as e:  # noqa: BLE001 - any failure: fall back, and say why
            kind = f"params (timing failed: {type(e).__name__})"
            return kind, [1.0 + la.count_params() for la in layers]
    return "params", [1.0 + la.count_params() for la in layers]


def _inputs_of(layers, input_shape, input_dtype):
    shape, dtype = tuple(input_shape), input_dtype
    for layer in layers:
        yield layer, (shape, dtype)
        shape, dtype = _activation_shape(layer), "float32"


def _time_layer(layer, shape_dtype, batch: int) -> float:
    return _median_seconds(_forward_backward([layer]), _zeros(shape_dtype, batch))


def _zeros(shape_dtype, batch: int):
    import tensorflow as tf

    shape, dtype = shape_dtype
    return tf.zeros((batch, *shape), dtype)


def _forward_backward(layers, device: str | None = None):
    """A tf.function of one forward and backward pass through ``layers``."""
    import tensorflow as tf

    variables = [v for la in layers for v in la.trainable_variables]

    @tf.function
    def forward_backward(x):
        with tf.device(device), tf.GradientTape() as tape:
            if x.dtype.is_floating:
                tape.watch(x)
            y = x
            for layer in layers:
                y = layer(y, training=True)
            total = tf.reduce_sum(y)
            sources = variables + ([x] if x.dtype.is_floating else [])
            return tape.gradient(total, sources) if sources else total

    return forward_backward


def median_call_seconds(call, repeats: int = 7) -> float:
    """The median wall time of ``repeats`` calls of ``call``, after one that
    traces or warms up."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _median_seconds(fn, x, repeats: int = 7) -> float:
    import tensorflow as tf

    # The results read back (a sparse gradient, an embedding's, through its
    # components), so that the time is the work's, not its dispatch.
    return median_call_seconds(
        lambda: tf.nest.map_structure(
            lambda t: t.numpy() if t is not None else None, fn(x), expand_composites=True
        ),
        repeats,
    )


# -- placement ----------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    index: int
    device: str
    layers: list
    cost: float
    activation_values: int  # floats the stage keeps per example for its backward pass

    @property
    def variables(self) -> list:
        return [v for la in self.layers for v in la.trainable_variables]

    @property
    def layer_names(self) -> list[str]:
        return [la.name for la in self.layers]


def place(model, devices: Sequence[str], bounds: Sequence[int], costs: Sequence[float]):
    """``model`` with the variables of stage k's pieces moved to ``devices[k]``
    (the same layers and variables: the same checkpoints and export), and its
    stages. Nothing is cloned, so any layer, custom or not, can be placed."""
    from tftrain import _internal

    pieces = segments(model)
    stages = []
    for k in range(len(bounds) - 1):
        chunk = pieces[bounds[k] : bounds[k + 1]]
        for piece in chunk:
            for variable in piece.weights:
                _internal.move_variable(variable, devices[k])
        values = sum(_size(_activation_shape(p)) for p in chunk)
        stages.append(Stage(k, devices[k], chunk, sum(costs[bounds[k] : bounds[k + 1]]), values))
    return model, stages


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- the step -----------------------------------------------------------------


class PipelineTrainer(Trainer):
    """The trainer whose step runs the model's stages as a pipeline.

    Args:
      stages: the model's stages (from :func:`place`), in order.
      pipeline_schedule: ``gpipe`` or ``1f1b``.
      (the rest: as :class:`tftrain.trainer.Trainer`; ``num_microbatches``
      is M, the micro-batches that flow through the pipeline each step.)
    """

    def __init__(self, *, stages, pipeline_schedule: str = "gpipe", **kwargs):
        super().__init__(**kwargs)
        self.stages = list(stages)
        self.schedule = pipeline_schedule
        self._actions = schedule(pipeline_schedule, len(self.stages), self.num_microbatches)
        self._order = construction_order(self._actions)
        self._slot = {id(v): i for i, v in enumerate(self.model.trainable_variables)}
        self._probes = None  # each stage's timing function, built on first use

    def timings(self) -> dict[str, float]:
        """Each stage's compute per step in milliseconds: one micro-batch's
        forward and backward pass on the stage's device, measured alone, times
        the micro-batches of a step."""
        micro = self.global_batch_size // self.num_microbatches
        if self._probes is None:
            shape = tuple(self.model.inputs[0].shape[1:]), self.model.inputs[0].dtype
            self._probes = []
            for stage in self.stages:
                self._probes.append((_forward_backward(stage.layers, stage.device), shape))
                shape = _activation_shape(stage.layers[-1]), "float32"
        return {
            f"pipeline/stage_{k}_ms": 1000.0
            * self.num_microbatches
            * _median_seconds(fn, _zeros(shape, micro), repeats=3)
            for k, (fn, shape) in enumerate(self._probes)
        }

    def peak_activation_values(self) -> list[int]:
        """Per stage: floats of activations held at the schedule's peak, per example
        of a micro-batch times the micro-batch's examples."""
        per_micro = self.global_batch_size // self.num_microbatches
        return [
            peak_in_flight(actions) * stage.activation_values * per_micro
            for actions, stage in zip(self._actions, self.stages)
        ]

    def outputs(self, inputs, training: bool = False):
        import tensorflow as tf

        for stage in self.stages:
            with tf.device(stage.device):
                for layer in stage.layers:
                    inputs = layer(inputs, training=training)
        return inputs

    def accumulate_gradients(self, inputs, labels, weights=None):
        import tensorflow as tf

        K, M = len(self.stages), self.num_microbatches
        last = K - 1
        xs, ys, ws = zip(*split_batch((inputs, labels, weights), M))
        forward = {}  # (k, j) -> (stage input, stage output or loss, tape)
        upstream = {}  # (k, j) -> gradient of the loss w.r.t. stage k's output
        weight_grads = {}  # (k, j) -> gradients of stage k's variables
        stats = {}
        after = [[] for _ in range(K)]  # each stage's previous action: run in order
        for kind, k, j in self._order:
            stage = self.stages[k]
            with tf.device(stage.device), tf.control_dependencies(after[k]):
                if kind == "F":
                    x = xs[j] if k == 0 else forward[(k - 1, j)][1]
                    with tf.GradientTape() as tape:
                        if k > 0:
                            tape.watch(x)
                        y = x
                        for layer in stage.layers:
                            y = layer(y, training=True)
                        if k == last:
                            per_example = self.scorer.per_example_loss(ys[j], y, ws[j])
                            y_loss = tf.nn.compute_average_loss(
                                per_example, global_batch_size=self.global_batch_size
                            )
                    if k == last:
                        stats[j] = self.scorer.batch_stats(ys[j], y, per_example, ws[j])
                        y = y_loss
                    forward[(k, j)] = (x, y, tape)
                    after[k] = [y]
                else:
                    x, y, tape = forward.pop((k, j))
                    sources = stage.variables + ([x] if k > 0 else [])
                    grads = tape.gradient(
                        y, sources, output_gradients=None if k == last else upstream.pop((k, j))
                    )
                    n = len(stage.variables)
                    weight_grads[(k, j)] = grads[:n]
                    if k > 0:
                        upstream[(k - 1, j)] = grads[n]
                    after[k] = [gradient_tensor(g) for g in grads if g is not None]
        total = [None] * len(self._slot)
        for k, stage in enumerate(self.stages):
            for j in range(M):  # micro-batch order, whatever the schedule
                for v, g in zip(stage.variables, weight_grads[(k, j)]):
                    total[self._slot[id(v)]] = _accumulate(total[self._slot[id(v)]], g)
        if self.model.losses:  # weight regularisation: once per step
            with tf.GradientTape() as tape:
                penalty = tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            extra = tape.gradient(penalty, self.model.trainable_variables)
            total = [_accumulate(t, e) for t, e in zip(total, extra)]
        summed = stats[0]
        for j in range(1, M):
            summed = summed + stats[j]
        return total, summed

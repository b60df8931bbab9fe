"""What happens after a stretch of training steps or an evaluation: the
progress line, TensorBoard scalars and histograms, the divergence checks, a
profile. Each action is built with the components it needs and is then
called with an output only (:class:`TrainOutput` after each stretch of
steps, :class:`EvalOutput` after each evaluation); it never sees the
controller, and the controller never looks for one: any of them can be left
out, replaced or joined by the caller's own.

A train action says when it is due (``interval``, or ``steps_until_due`` and
``due`` for irregular steps); the controller ends each stretch at the next
step an action is due and calls the due ones in order, with an output of
the steps since the last one. Eval actions run after every evaluation.
The checks that stop a diverged run (:func:`guards`) are the controller's
own, run whatever actions it is given.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

from tftrain.errors import DivergedError


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


@dataclasses.dataclass(frozen=True)
class TrainOutput:
    """One stretch of training steps, as the controller measured it."""

    step: int  # the global step after the stretch
    total_steps: int
    steps_per_epoch: int | None  # None: the data's length is unknown
    # Steps and wall time since the last output (one stretch or several:
    # an output is made when an action is due).
    steps: int
    seconds: float
    global_batch_size: int
    # The task's loss and metrics over those steps, by their own names
    # (empty where every update was skipped under --on_nan=skip_step).
    metrics: dict
    learning_rate: float
    # What the trainer adds: gradient_norm, the trainer's own scalars
    # ("staleness/mean"), and the updates skipped (non-finite).
    extra: dict
    nonfinite_steps: int  # updates skipped in those steps
    skipped_total: int  # and since the run began here
    histograms: dict  # the trainer's own (staleness), tag -> array
    # The run's speed so far in examples/s, leaving out the first stretch
    # (which traces the graph) unless it is the only one; None until then.
    steady_speed: float | None
    started: float  # time.time() when the run began here

    @property
    def last(self) -> bool:
        return self.step >= self.total_steps

    @property
    def examples_per_second(self) -> float:
        return self.steps * self.global_batch_size / max(self.seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class EvalOutput:
    """One evaluation of the test split."""

    step: int
    total_steps: int
    metrics: dict  # the task's loss and metrics, "examples" too
    # The trainer's timings of the step's parts, measured with the
    # evaluation (a pipeline's stages; empty for most trainers).
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def scores(self) -> dict:
        """The loss and metrics by name, without the count of examples."""
        return {k: v for k, v in self.metrics.items() if k != "examples"}


class Action:
    """Runs every ``interval`` steps and after the last step (interval None:
    after every stretch of steps)."""

    interval: int | None = None

    def steps_until_due(self, step: int) -> int | None:
        return None if self.interval is None else self.interval - step % self.interval

    def due(self, step: int, last: bool) -> bool:
        return last or self.interval is None or step % self.interval == 0

    def begin(self, step: int) -> None:
        """Called once before the first stretch, at the step the run starts from."""

    def __call__(self, output) -> None:
        raise NotImplementedError


class StopOnNonFinite(Action):
    """Under --on_nan=stop: a non-finite training loss or gradient norm ends
    the run, naming the steps and the last good checkpoint.

    Args:
      last_checkpoint: returns the newest checkpoint's path, or None.
    """

    def __init__(self, last_checkpoint: Callable[[], str | None]):
        self.last_checkpoint = last_checkpoint

    def __call__(self, output: TrainOutput) -> None:
        loss = output.metrics.get("loss", 0.0)
        if math.isfinite(loss) and not output.nonfinite_steps:
            return
        first = output.step - output.steps + 1
        what = (
            f"the training loss became {loss}"
            if not math.isfinite(loss)
            else f"the gradients' norm became NaN or infinite in {output.nonfinite_steps} step(s)"
        )
        saved = self.last_checkpoint()
        raise DivergedError(
            f"{what} in steps {first}-{output.step}: the run diverged and was stopped. "
            + (
                f"The last good checkpoint is {saved}. "
                if saved
                else "No checkpoint was saved before it. "
            )
            + "Try a lower --learning_rate (or a warm-up, --warmup_epochs), or "
            "--on_nan=skip_step to skip such updates; nothing was exported."
        )


class TrainSummaries(Action):
    """TensorBoard's train scalars (the task's loss and metrics, the learning
    rate, the gradients' norm, the speed) and the trainer's histograms.

    Args:
      summaries: a summaries.Summaries.
      count_skipped: record train/skipped_steps (--on_nan=skip_step).
    """

    def __init__(self, summaries, interval: int | None = None, count_skipped: bool = False):
        self.summaries, self.interval, self.count_skipped = summaries, interval, count_skipped
        self.stretches = 0

    def __call__(self, output: TrainOutput) -> None:
        self.stretches += 1
        scalars = {"learning_rate": output.learning_rate, **output.metrics}
        scalars.update({k: v for k, v in output.extra.items() if k != "gradient_norm"})
        norm = output.extra.get("gradient_norm")
        if norm is not None and math.isfinite(norm):
            scalars["gradient_norm"] = norm
        if self.count_skipped:
            scalars["skipped_steps"] = output.nonfinite_steps
        # The speed of the steps since the last output, not a running average;
        # the first stretch traces the graph, so its speed is left out (unless
        # it is the whole run).
        if self.stretches > 1 or output.last:
            scalars["examples_per_second"] = output.examples_per_second
            scalars["steps_per_second"] = output.steps / max(output.seconds, 1e-9)
        self.summaries.scalars("train", output.step, scalars)
        self.summaries.histograms("train", output.step, output.histograms)


class ProgressLine(Action):
    """The console's progress line, at most every ``log_interval_secs``
    seconds and at every epoch's end and the run's.

    Args:
      log: prints a line (the chief's).
    """

    def __init__(self, log, log_interval_secs: float, interval: int | None = None):
        self.log, self.log_interval_secs, self.interval = log, log_interval_secs, interval
        self.last_line = 0.0

    def __call__(self, output: TrainOutput) -> None:
        now = time.time()
        per_epoch, total = output.steps_per_epoch, output.total_steps
        boundary = output.step % (per_epoch or total) == 0 or output.last
        if now - self.last_line < self.log_interval_secs and not boundary:
            return
        self.last_line = now
        # Until a stretch after the first has run, the only speed includes the
        # graph's tracing: no speed or ETA is made up from it.
        speed = output.steady_speed
        if speed:
            eta = format_duration((total - output.step) * output.global_batch_size / speed)
            pace = f"{speed:,.0f} examples/s"
        else:
            eta, pace = "after the first loop", "tracing the step"
        epoch = (
            f"epoch {output.step / per_epoch:.2f}/{math.ceil(total / per_epoch)}  "
            if per_epoch
            else ""
        )
        extra = output.extra
        stale = (
            f"staleness {extra['staleness/mean']:.2f} (max {extra['staleness/max']:.0f})  "
            if "staleness/mean" in extra
            else ""
        )
        skipped = output.skipped_total
        skips = f"skipped {skipped} update(s) so far (non-finite)  " if skipped else ""
        scores = (
            "".join(f"{k} {v:.4f}  " for k, v in output.metrics.items())
            if output.metrics
            else "(no finite batch)  "
        )
        self.log(
            f"step {output.step}/{total}  {epoch}{scores}"
            f"lr {output.learning_rate:.3g}  {pace}  {stale}{skips}"
            f"elapsed {format_duration(now - output.started)}  ETA {eta}"
        )


class Histograms(Action):
    """Histograms of every weight and of one training batch's gradients at
    the current weights (the first ``batch_size`` training examples, computed
    on the chief, not applied): TensorBoard's Histograms and Distributions tabs.

    Args:
      variables: the trainable variables.
      probe_gradients: their gradients on one batch, not applied.
    """

    def __init__(
        self,
        variables,
        probe_gradients: Callable[[], list],
        summaries,
        interval: int,
        is_chief: bool = True,
    ):
        self.variables, self.probe_gradients = variables, probe_gradients
        self.summaries, self.interval, self.is_chief = summaries, interval, is_chief

    def __call__(self, output: TrainOutput) -> None:
        from tftrain.trainer import gradient_tensor

        if not self.is_chief:  # (due on every worker, so that all end stretches alike)
            return
        values = {}
        for variable, gradient in zip(self.variables, self.probe_gradients()):
            values[f"weights/{variable.path}"] = variable.numpy()
            if gradient is not None:
                values[f"gradients/{variable.path}"] = gradient_tensor(gradient).numpy()
        self.summaries.histograms("train", output.step, values)


class Profile(Action):
    """A profiler trace of steps START+1..END (``--profile_steps``) in
    ``folder``/plugins/profile, for TensorBoard's Profile tab: this process's
    ops (the chief's, in a cluster: due on every worker, so that all end
    their stretches at the same steps)."""

    def __init__(self, start: int, end: int, folder: str, log, is_chief: bool = True):
        self.start, self.end, self.folder, self.log = start, end, folder, log
        self.is_chief = is_chief
        self.tracing = False

    def steps_until_due(self, step: int) -> int | None:
        ahead = [s - step for s in (self.start, self.end) if s > step]
        return min(ahead) if ahead else None

    def due(self, step: int, last: bool) -> bool:
        return step in (self.start, self.end) or (last and self.tracing)

    def begin(self, step: int) -> None:
        if step == self.start:
            self._toggle(step)

    def __call__(self, output: TrainOutput) -> None:
        if (output.step == self.start and not self.tracing) or self.tracing:
            self._toggle(output.step)

    def _toggle(self, step: int) -> None:
        import os

        import tensorflow as tf

        if not self.is_chief:
            return
        if not self.tracing:
            tf.profiler.experimental.start(self.folder)
            self.tracing = True
            return
        tf.profiler.experimental.stop()
        self.tracing = False
        self.log(
            f"profiled steps {self.start + 1}-{step}: TensorBoard's Profile tab "
            f"(trace in {os.path.join(self.folder, 'plugins', 'profile')})"
            + ("." if profile_plugin_installed() else _NO_PROFILE_PLUGIN)
        )


# TensorBoard shows no Profile tab without its plugin (the [profile] extra).
_NO_PROFILE_PLUGIN = (
    ", which needs TensorBoard's profile plugin, not installed here: "
    "pip install 'tftrain[profile]' (or tensorboard-plugin-profile)."
)


def profile_plugin_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard_plugin_profile") is not None


# -- after each evaluation ----------------------------------------------------


class TimingSummaries:
    """The trainer's timings of the step's parts (a pipeline's stages),
    measured with each evaluation, as TensorBoard train scalars."""

    def __init__(self, summaries):
        self.summaries = summaries

    def __call__(self, output: EvalOutput) -> None:
        if output.timings:
            self.summaries.scalars("train", output.step, output.timings)


class EvalSummaries:
    """TensorBoard's eval scalars and the console's evaluation line."""

    def __init__(self, summaries, log):
        self.summaries, self.log = summaries, log

    def __call__(self, output: EvalOutput) -> None:
        scores = output.scores
        self.summaries.scalars("eval", output.step, scores)
        self.summaries.flush()
        self.log(
            f"eval at step {output.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
        )


class StopIfDiverged:
    """A non-finite evaluation loss ends the run; so does a finished run
    whose model has more than twice the untrained model's test loss and no
    clearly better accuracy than it (or than chance, when it scored below),
    even where every number stayed finite. Overfitting raises the loss, not
    the accuracy, back to there; a run too short to learn keeps about the
    same loss.

    Args:
      untrained: returns the untrained model's (loss, accuracy), NaN where
        unknown (a run resumed from a checkpoint written before tftrain kept it).
      num_classes: the classes where the task has an accuracy; else None.
    """

    def __init__(self, untrained: Callable[[], tuple[float, float]], num_classes: int | None):
        self.untrained, self.num_classes = untrained, num_classes

    def __call__(self, output: EvalOutput) -> None:
        metrics, step = output.metrics, output.step
        if not math.isfinite(metrics["loss"]):
            raise DivergedError(
                f"the evaluation loss at step {step} is {metrics['loss']}: the model "
                "outputs NaN or infinite values, so it was not exported. Try a lower "
                "--learning_rate."
            )
        if step < output.total_steps or step == 0:
            return
        loss, accuracy = self.untrained()
        if not math.isfinite(loss) or metrics["loss"] <= 2 * loss:
            return
        # Overfitting can raise a classifier's loss that far, but not take its
        # accuracy back to chance: a task with an accuracy is judged by both.
        if "accuracy" in metrics and self.num_classes and math.isfinite(accuracy):
            chance = 1.0 / max(self.num_classes, 2)
            if metrics["accuracy"] > max(accuracy, chance) + 0.05:
                return
            now = f"loss {metrics['loss']:.4g}, accuracy {metrics['accuracy']:.4f}"
            then = f"loss {loss:.4g}, accuracy {accuracy:.4f}"
        else:
            now, then = f"loss {metrics['loss']:.4g}", f"loss {loss:.4g}"
        raise DivergedError(
            f"the trained model is worse than the untrained one (step {step}: {now}; "
            f"step 0: {then}): the run diverged, so it was not "
            "exported. Try a lower --learning_rate (or a warm-up, --warmup_epochs), "
            "with --restart."
        )


def default_actions(config, plan, parts, *, out, log, is_chief: bool):
    """``(train_actions, eval_actions)`` of a run: TensorBoard's train
    scalars and the progress line after every stretch (or every
    --summary_every steps); histograms and a profile when asked for. After
    each evaluation: its scalars and line, and the stage timings. (The
    divergence checks are the controller's own: :func:`guards`.)

    Args:
      parts: the run's components (controller.Components).
      out: where this task writes (``out.path(...)``).
      log: the chief's console (a no-op on other tasks).
    """
    every = config.summary_every
    train = [
        TrainSummaries(parts.summaries, every, count_skipped=config.on_nan == "skip_step"),
        ProgressLine(log, config.log_interval_secs, every),
    ]
    if config.histogram_every:
        train.append(
            Histograms(
                parts.model.trainable_variables,
                lambda: parts.trainer.probe_gradients(parts.sample_batch),
                parts.summaries,
                config.histogram_every,
                is_chief=is_chief,
            )
        )
    if config.profile_steps:
        train.append(
            Profile(*config.profile_steps, folder=out.path(""), log=log, is_chief=is_chief)
        )
    evals = [EvalSummaries(parts.summaries, log), TimingSummaries(parts.summaries)]
    return train, evals


def guards(config, parts):
    """``(train_guards, eval_guards)``: the checks that stop a diverged run,
    which the controller runs whatever actions it is given (the non-finite
    check under --on_nan=stop after each stretch; after each evaluation, a
    non-finite loss and, at the end, a model worse than the untrained one)."""
    train = []
    if config.on_nan == "stop":
        train.append(StopOnNonFinite(lambda: parts.checkpoints.last_saved))
    untrained = lambda: tuple(float(v) for v in parts.untrained_eval.numpy())
    return train, [StopIfDiverged(untrained, parts.num_classes)]

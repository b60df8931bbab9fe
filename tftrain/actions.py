"""What the controller does between loops of steps: progress, evaluation,
checkpoints. Each action says when it is due; the controller ends each
stretch of steps at the next step an action is due, then runs the due ones
in order. A new action is a class here (or the caller's) with ``interval``
and ``__call__``.
"""

from __future__ import annotations

import math
import time

from tftrain.errors import DivergedError


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Action:
    """Runs every ``interval`` steps and after the last step (interval None:
    after every stretch of steps)."""

    interval: int | None = None

    def steps_until_due(self, step: int) -> int | None:
        return None if self.interval is None else self.interval - step % self.interval

    def due(self, step: int, last: bool) -> bool:
        return last or self.interval is None or step % self.interval == 0

    def __call__(self, run, step: int, seconds: float, steps: int) -> None:
        """``seconds``: how long the ``steps`` steps just finished took."""
        raise NotImplementedError

    def begin(self, run, step: int) -> None:
        """Called once before the first stretch, at the step the run starts from."""


class Progress(Action):
    """Training metrics: TensorBoard train scalars and the console's progress line.

    The steady speed leaves out the first stretch, which traces the graph,
    unless it is the only one.
    """

    def __init__(self, interval: int | None = None):
        self.interval = interval  # None: after every stretch of steps
        self.seconds, self.examples, self.stretches = 0.0, 0, 0
        self.started, self.last_line = time.time(), 0.0
        self.skipped = 0  # updates skipped under --on_nan=skip_step

    def steady_speed(self) -> tuple[float, float]:
        return (self.examples / self.seconds if self.seconds else 0.0), self.seconds

    @staticmethod
    def _check_finite(run, metrics, step, steps) -> None:
        """Under --on_nan=stop, a non-finite loss or gradient norm ends the run."""
        nonfinite = metrics.get("nonfinite_steps", 0)
        if run.config.on_nan != "stop" or (math.isfinite(metrics["loss"]) and not nonfinite):
            return
        what = (
            f"the training loss became {metrics['loss']}"
            if not math.isfinite(metrics["loss"])
            else f"the gradients' norm became NaN or infinite in {nonfinite} step(s)"
        )
        raise DivergedError(
            f"{what} in steps {step - steps + 1}-{step}: the run diverged and was stopped. "
            + (
                f"The last good checkpoint is {run.checkpoints.last_saved}. "
                if run.checkpoints.last_saved
                else "No checkpoint was saved before it. "
            )
            + "Try a lower --learning_rate (or a warm-up, --warmup_epochs), or "
            "--on_nan=skip_step to skip such updates; nothing was exported."
        )

    def __call__(self, run, step, seconds, steps) -> None:
        config, plan = run.config, run.plan
        metrics = run.trainer.take_train_metrics()
        self._check_finite(run, metrics, step, steps)
        skipped = metrics.pop("nonfinite_steps", 0)
        self.skipped += skipped
        self.stretches += 1
        if self.stretches > 1 or step == plan.total_steps:
            self.seconds += seconds
            self.examples += steps * config.batch_size
        speed = (
            self.examples / self.seconds
            if self.seconds
            else steps * config.batch_size / max(seconds, 1e-9)
        )
        lr = run.learning_rate()
        extra = {k: v for k, v in metrics.items() if "/" in k}  # a trainer's own (staleness/...)
        scalars = {"learning_rate": lr, **extra}
        scores = {k: metrics[k] for k in ["loss", *run.scorer.metric_names] if k in metrics}
        if metrics["examples"]:  # (every batch can be skipped under --on_nan=skip_step)
            scalars.update(scores)
        if "gradient_norm" in metrics and math.isfinite(metrics["gradient_norm"]):
            scalars["gradient_norm"] = metrics["gradient_norm"]
        if config.on_nan == "skip_step":
            scalars["skipped_steps"] = skipped
        # The speed of the interval just finished, not a running average; the
        # first interval traces the graph, so its speed is left out (unless it
        # is the whole run).
        if self.stretches > 1 or step == plan.total_steps:
            scalars["examples_per_second"] = steps * config.batch_size / max(seconds, 1e-9)
            scalars["steps_per_second"] = steps / max(seconds, 1e-9)
        run.summaries.scalars("train", step, scalars)
        run.summaries.histograms("train", step, run.trainer.histograms())
        now = time.time()
        boundary = step % plan.epoch_steps == 0 or step == plan.total_steps
        if now - self.last_line < config.log_interval_secs and not boundary:
            return
        self.last_line = now
        # Until a loop after the first has run, the only speed includes the
        # graph's tracing: no speed or ETA is made up from it.
        steady = self.seconds > 0
        eta = (plan.total_steps - step) * config.batch_size / max(speed, 1e-9)
        eta_text = format_duration(eta) if steady else "after the first loop"
        pace = f"{speed:,.0f} examples/s" if steady else "tracing the step"
        epoch = (
            f"epoch {step / plan.steps_per_epoch:.2f}/"
            f"{math.ceil(plan.total_steps / plan.steps_per_epoch)}  "
            if plan.steps_per_epoch
            else ""
        )
        stale = (
            f"staleness {extra['staleness/mean']:.2f} (max {extra['staleness/max']:.0f})  "
            if "staleness/mean" in extra
            else ""
        )
        skips = f"skipped {self.skipped} update(s) so far (non-finite)  " if self.skipped else ""
        run.chief_log(
            f"step {step}/{plan.total_steps}  {epoch}"
            + (
                "".join(f"{k} {v:.4f}  " for k, v in scores.items())
                if metrics["examples"]
                else "".join(f"{k} -  " for k in scores) + "(no finite batch)  "
            )
            + f"lr {lr:.3g}  {pace}  {stale}{skips}"
            f"elapsed {format_duration(now - self.started)}  ETA {eta_text}"
        )


class Evaluate(Action):
    """Evaluates on the test split: TensorBoard eval scalars and a console line."""

    def __init__(self, interval: int):
        self.interval = interval

    def __call__(self, run, step, seconds=0.0, steps=0) -> None:
        run.watchdog.kick(f"evaluating at step {step}")
        metrics = run.mode.evaluate(run.trainer, run.eval_data)
        if not math.isfinite(metrics["loss"]):
            raise DivergedError(
                f"the evaluation loss at step {step} is {metrics['loss']}: the model "
                "outputs NaN or infinite values, so it was not exported. Try a lower "
                "--learning_rate."
            )
        scores = {k: metrics[k] for k in ["loss", *run.scorer.metric_names] if k in metrics}
        run.summaries.scalars("eval", step, scores)
        run.summaries.flush()
        run.chief_log(
            f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
        )
        if step == 0:
            run.untrained_eval.assign([metrics["loss"], metrics.get("accuracy", float("nan"))])
        elif step == run.plan.total_steps:
            self._check_better_than_untrained(run, step, metrics)
        run.last_eval = metrics

    @staticmethod
    def _check_better_than_untrained(run, step, metrics) -> None:
        """A finished run whose model has more than twice the untrained
        model's test loss and no clearly better accuracy than it (or than
        chance, when it scored below) diverged, even where every number
        stayed finite. Overfitting raises the loss, not the accuracy, back
        to there; a run too short to learn keeps about the same loss."""
        loss, accuracy = (float(v) for v in run.untrained_eval.numpy())
        if not math.isfinite(loss):  # no step-0 evaluation (an older checkpoint)
            return
        if metrics["loss"] <= 2 * loss:
            return
        # Overfitting can raise a classifier's loss that far, but not take its
        # accuracy back to chance: a task with an accuracy is judged by both.
        if "accuracy" in metrics and run.num_classes and math.isfinite(accuracy):
            chance = 1.0 / max(run.num_classes, 2)
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


class Timings(Action):
    """The trainer's timings of the step's parts (``Trainer.timings``; a
    pipeline's stages) as TensorBoard train scalars, when it has any."""

    def __init__(self, interval: int):
        self.interval = interval

    def __call__(self, run, step, seconds=0.0, steps=0) -> None:
        values = run.trainer.timings()
        if values:
            run.summaries.scalars("train", step, values)
            run.last_timings = values


class Histograms(Action):
    """Histograms of every weight and of one training batch's gradients at
    the current weights (the first ``batch_size`` training examples, computed
    on the chief, not applied): TensorBoard's Histograms and Distributions tabs."""

    def __init__(self, interval: int):
        self.interval = interval

    def __call__(self, run, step, seconds=0.0, steps=0) -> None:
        from tftrain.trainer import gradient_tensor

        if not run.mode.placement.is_chief:
            return
        variables = run.model.trainable_variables
        gradients = run.trainer.probe_gradients(run.sample_batch)
        values = {}
        for variable, gradient in zip(variables, gradients):
            values[f"weights/{variable.path}"] = variable.numpy()
            if gradient is not None:
                values[f"gradients/{variable.path}"] = gradient_tensor(gradient).numpy()
        run.summaries.histograms("train", step, values)


class Profile(Action):
    """A profiler trace of steps START+1..END (``--profile_steps``) in
    model_dir/plugins/profile, for TensorBoard's Profile tab: this process's
    ops (on a cluster, the chief's)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.tracing = False

    def steps_until_due(self, step: int) -> int | None:
        ahead = [s - step for s in (self.start, self.end) if s > step]
        return min(ahead) if ahead else None

    def due(self, step: int, last: bool) -> bool:
        return step in (self.start, self.end) or (last and self.tracing)

    def begin(self, run, step: int) -> None:
        if step == self.start:
            self._toggle(run, step)

    def __call__(self, run, step, seconds=0.0, steps=0) -> None:
        if (step == self.start and not self.tracing) or self.tracing:
            self._toggle(run, step)

    def _toggle(self, run, step: int) -> None:
        import tensorflow as tf

        if not run.mode.placement.is_chief:
            return
        if not self.tracing:
            tf.profiler.experimental.start(run.out.path(""))
            self.tracing = True
            return
        tf.profiler.experimental.stop()
        self.tracing = False
        run.chief_log(
            f"profiled steps {self.start + 1}-{step}: TensorBoard's Profile tab "
            f"(trace in {run.out.path('plugins', 'profile')})."
        )


class SaveCheckpoint(Action):
    def __init__(self, interval: int):
        self.interval = interval

    def __call__(self, run, step, seconds=0.0, steps=0) -> None:
        run.watchdog.kick(f"saving the checkpoint of step {step}")
        run.checkpoints.save(step)


def default_actions(config, plan) -> list[Action]:
    """Progress after every stretch (or every --summary_every steps);
    evaluation and a checkpoint once an epoch (or every --eval_interval /
    --checkpoint_interval steps); histograms and a profile when asked for."""
    actions = [
        Progress(config.summary_every),
        Evaluate(config.eval_interval or plan.epoch_steps),
        Timings(config.eval_interval or plan.epoch_steps),
    ]
    if config.histogram_every:
        actions.append(Histograms(config.histogram_every))
    if config.profile_steps:
        actions.append(Profile(*config.profile_steps))
    return actions + [SaveCheckpoint(config.checkpoint_interval or plan.epoch_steps)]

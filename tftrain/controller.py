"""The outer loop of one run: restore, stretches of steps with the actions
due after each, then finish (export and ``metrics.json``).

Everything strategy-specific goes through the parallel mode
(:mod:`tftrain.distribute.base`); everything task-specific through the task
(:mod:`tftrain.tasks`); what is done with each stretch's and evaluation's
outputs is an action (:mod:`tftrain.actions`). Only the chief writes into
``model_dir`` (but for each worker's own input position, beside the
checkpoints); other workers write to a scratch folder that they delete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from tftrain import _internal, export, fileio, inputs, optimizers, tasks
from tftrain import actions as actions_lib
from tftrain import checkpoints as checkpoints_lib
from tftrain.checkpoints import Checkpoints
from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute.base import ParallelMode
from tftrain.distribute.watchdog import NoWatchdog
from tftrain.errors import RunError
from tftrain.stopping import NeverStop, Stopped
from tftrain.summaries import Summaries, hparams_of

__all__ = ["Components", "Controller", "Plan", "RunError", "build_components", "run"]


def _strict(value):
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json_atomically(path: str, payload: dict) -> None:
    """A full disk leaves the old file whole, and no .tmp beside it."""
    text = json.dumps(_strict(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
    fileio.write_text_atomically(path, text)


class _Output:
    """Where this task writes: the run's folder on the chief, a scratch folder
    elsewhere (deleted when the run ends)."""

    def __init__(self, model_dir: str, is_chief: bool, worker_index: int):
        self.model_dir = model_dir
        self._scratch = (
            None if is_chief else tempfile.mkdtemp(prefix=f"tftrain_worker{worker_index}_")
        )

    def path(self, *parts: str) -> str:
        return os.path.join(self._scratch or self.model_dir, *parts)

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long a run trains, decided before any variable exists."""

    steps_per_epoch: int | None  # None: the data's length is unknown
    total_steps: int

    @property
    def epoch_steps(self) -> int:
        """The steps of an epoch, or of the whole run where an epoch's length is unknown."""
        return self.steps_per_epoch or self.total_steps

    @classmethod
    def make(cls, config: ExperimentConfig, task, probe: inputs.Probe) -> Plan:
        per_epoch = probe.steps_per_epoch
        if per_epoch is None and not config.train_steps:
            raise ConfigError(
                f"the length of {type(task).__name__}'s training data is unknown (files "
                "read as a stream): set --train_steps (and --steps_per_epoch, the steps "
                "of one pass, for once-an-epoch evaluation and checkpoints)."
            )
        total = config.train_steps or config.epochs * per_epoch
        if config.profile_steps and config.profile_steps[1] > total:
            raise ConfigError(
                f"--profile_steps={','.join(map(str, config.profile_steps))}: the run has "
                f"{total} steps; expected END <= {total}."
            )
        return cls(per_epoch, total)


def set_precision(precision: str) -> None:
    """The dtype policy of every layer built from here on (Keras's global
    setting): ``bfloat16`` computes in bfloat16, keeps variables in float32."""
    keras.mixed_precision.set_dtype_policy(
        {"bfloat16": "mixed_bfloat16", "float64": "float64"}.get(precision, "float32")
    )


@dataclasses.dataclass
class Components:
    """What one run trains with, built before the controller and handed to it.

    Attributes:
      task: the run's Task.
      model: the model to train (placed by the mode).
      optimizer: its optimizer.
      trainer: runs the steps and evaluations (the mode's Trainer).
      scorer: the task's loss and metrics.
      checkpoints: saves and restores the run (checkpoints.Checkpoints).
      summaries: TensorBoard's writers (summaries.Summaries).
      sample_batch: one global training batch (the export's and graph's shapes).
      untrained_eval: the untrained model's test (loss, accuracy), a
        checkpointed variable (NaN until the step-0 evaluation).
      num_classes: the classes where the task has an accuracy; else None.
      train_iterator: the training iterator whose position is checkpointed,
        or None where the stream is built at the restored step.
    """

    task: object
    model: keras.Model
    optimizer: object
    trainer: object
    scorer: tasks.Scorer
    checkpoints: Checkpoints
    summaries: Summaries
    sample_batch: tuple
    untrained_eval: tf.Variable
    num_classes: int | None
    train_iterator: object = None
    decay_left_out: list = dataclasses.field(default_factory=list)  # under --weight_decay


def build_components(
    config, mode: ParallelMode, plan: Plan, task, probe: inputs.Probe, out, log, watchdog
) -> Components:
    """The model (under the strategy's scope, placed by the mode), its
    optimizer, trainer, scorer, checkpoints and summaries."""
    placement = mode.placement
    # One global batch, read once: the checks of the model against the loss,
    # the shape of the export and of the graph, the histograms.
    sample_batch = probe.first_batch
    name = type(task).__name__
    watchdog.kick("creating the model's variables (all workers must join)")
    set_precision(config.precision)
    with placement.strategy.scope():
        model = tasks.call_user(f"{name}.build_model", task.build_model, config)
        if not isinstance(model, keras.Model):
            raise ConfigError(
                f"{name}.build_model returned {type(model).__name__}: expected a "
                "keras.Model (Sequential, functional or a subclass)."
            )
        if not model.built or not model.weights:  # a subclassed model: built by a call
            tasks.call_user(f"{name}: the model's call", model, sample_batch[0])
        if config.sync_batchnorm:
            synchronize_batchnorm(model)
        model = mode.place_model(model)
        optimizer = optimizers.from_config(config, plan.epoch_steps, plan.total_steps)
        left_out = []
        if config.weight_decay:
            left_out = optimizers.exclude_from_decay(
                optimizer, model.trainable_variables, config.weight_decay_exclude
            )
        optimizer.build(model.trainable_variables)
        # Checkpointed, so that a resumed run can still tell a diverged model
        # from a trained one.
        untrained_eval = tf.Variable(
            [float("nan")] * 2,
            trainable=False,
            name="untrained_eval",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
    # The run's identity, in every checkpoint: a resume is compared with it
    # (Controller.restore), whatever became of config.json.
    run_record = tf.Variable(
        json.dumps(config.identity(), sort_keys=True), trainable=False, name="run_record"
    )
    scorer = tasks.build_scorer(task, config, model, sample_batch)
    # Classes, where the model has an accuracy to compare with chance.
    num_classes = (
        int(model(sample_batch[0]).shape[-1]) if "accuracy" in scorer.metric_names else None
    )
    trainer = mode.make_trainer(
        strategy=placement.strategy,
        scorer=scorer,
        model=model,
        optimizer=optimizer,
        global_batch_size=config.batch_size,
        num_microbatches=config.microbatches,
        gradient_reducer=placement.gradient_reducer,
        skip_nonfinite=config.on_nan == "skip_step",
        local_replicas=mode.local_replicas,
    )
    objects = {
        "model": model,
        # Keras's checkpoint graph of a model leaves out some of its state,
        # such as a dropout layer's seed generator; without it a resumed run
        # would draw other dropout masks.
        "model_state": list(model.non_trainable_variables),
        "optimizer": optimizer,
        "global_step": trainer.global_step,
        "untrained_eval": untrained_eval,
        "run_record": run_record,
    }
    # The input position: a stream that is a function of the step (the
    # built-in one, tftrain.data's) is built at the step restored, on every
    # worker; any other's iterator state is saved in each checkpoint, where
    # the mode can save it.
    # In a cluster each worker keeps its own pipeline's position, beside the
    # checkpoint (its shuffle buffer holds its own examples, not the chief's).
    iterator, own_input = None, None
    if mode.saves_input_position and not probe.positioned:
        iterator = mode.distribute_train(inputs.stream(task, config, training=True))
        if mode.input_pipeline()[0] > 1:  # a pipeline per worker
            own_input = (iterator, placement.worker_index)
        else:
            objects["input"] = iterator
    checkpoints = Checkpoints(
        own_input=own_input,
        model_dir=config.model_dir,
        out=out,
        objects=objects,
        step_counter=trainer.global_step,
        keep=config.keep_checkpoints,
        is_chief=placement.is_chief,
        log=log,
    )
    return Components(
        task=task,
        model=model,
        optimizer=optimizer,
        trainer=trainer,
        scorer=scorer,
        checkpoints=checkpoints,
        summaries=Summaries(out, placement.is_chief),
        sample_batch=sample_batch,
        untrained_eval=untrained_eval,
        num_classes=num_classes,
        train_iterator=iterator,
        decay_left_out=left_out,
    )


def synchronize_batchnorm(model) -> int:
    """Makes every BatchNormalization layer of ``model`` (nested ones too)
    normalize with the global batch's statistics; returns how many."""
    layers = [
        layer
        for layer in _internal.all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in layers:
        layer.synchronized = True
    return len(layers)


class Controller:
    """One run's outer loop, in the order ``restore``, ``train``, ``finish``.

    It runs stretches of steps through the mode, evaluates and checkpoints at
    their intervals, and hands each stretch's and evaluation's outputs to the
    actions; it keeps what metrics.json needs (the last evaluation, the
    speed) itself.

    Args:
      config: the validated config.
      mode: the parallel mode, set up (``mode.setup()``).
      plan: the length of the run.
      parts: the run's components (:func:`build_components`).
      out: where this task writes.
      log: prints a line for the person watching.
      watchdog: told what the run does next, before each stage that can block.
      train_actions, eval_actions: called with each TrainOutput / EvalOutput
        (default: actions.default_actions).
      stop: says when a signal asked the run to stop (stopping.StopRequest).
    """

    def __init__(
        self,
        *,
        config,
        mode: ParallelMode,
        plan: Plan,
        parts: Components,
        out,
        log,
        watchdog,
        train_actions=None,
        eval_actions=None,
        stop=None,
    ):
        self.config, self.mode, self.plan, self.parts = config, mode, plan, parts
        self.out, self.log, self.watchdog = out, log, watchdog
        # Progress, evaluation and the plan are the chief's to say: in a cluster
        # every worker would print the same lines.
        is_chief = mode.placement.is_chief
        self.chief_log = log if is_chief else (lambda line: None)
        self.stop = stop or NeverStop()
        if train_actions is None or eval_actions is None:
            train, evals = actions_lib.default_actions(
                config, plan, parts, out=out, log=self.chief_log, is_chief=is_chief
            )
            train_actions = train if train_actions is None else train_actions
            eval_actions = evals if eval_actions is None else eval_actions
        self.train_actions, self.eval_actions = list(train_actions), list(eval_actions)
        self.train_guards, self.eval_guards = actions_lib.guards(config, parts)
        self.eval_interval = config.eval_interval or plan.epoch_steps
        self.checkpoint_interval = config.checkpoint_interval or plan.epoch_steps
        self.last_eval: dict | None = None
        self.last_timings: dict = {}
        # The steady speed: examples and seconds of every stretch after the
        # first (which traces the graph), or of the first where it is the only one.
        self.examples, self.seconds, self.stretches, self.skipped = 0, 0.0, 0, 0
        # Steps and seconds since the last TrainOutput.
        self.window_steps, self.window_seconds = 0, 0.0

    @property
    def step(self) -> int:
        return int(self.parts.trainer.global_step.numpy())

    def learning_rate(self) -> float:
        return float(tf.convert_to_tensor(self.parts.optimizer.learning_rate).numpy())

    def restore(self) -> int:
        self.watchdog.kick("restoring the latest checkpoint")
        if self.parts.checkpoints.good:
            self._check_same_run(self.parts.checkpoints.good[0])
        latest = self.parts.checkpoints.restore_latest()
        if latest:
            self.log(f"Resumed from {latest} at step {self.step}.")
        return self.step

    def _check_same_run(self, latest: str) -> None:
        """A resume is the same run: every field of the run's identity (the
        config but what MAY_CHANGE_ON_RESUME) equals the record in its
        checkpoint, or, in a checkpoint older than the record, in
        config.json. A change is refused before anything is restored."""
        where, in_checkpoint = latest, True
        try:
            raw = checkpoints_lib.reader(latest).get_tensor("run_record/.ATTRIBUTES/VARIABLE_VALUE")
            recorded = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except (tf.errors.OpError, ValueError, AttributeError, TypeError):
            where, in_checkpoint = os.path.join(self.config.model_dir, "config.json"), False
            try:
                recorded = json.loads(fileio.read_text(where))
            except (OSError, ValueError):
                return  # no record of the earlier run's settings
        if not isinstance(recorded, dict):
            return
        if "task" in recorded:
            recorded["task"] = tasks.plain_task_name(recorded["task"])
        now = json.loads(json.dumps(self.config.identity()))
        if in_checkpoint:  # the checkpoint's record: every field of the identity
            names = sorted(set(recorded) | set(now))
        else:  # config.json holds every field: compare those of the identity
            names = sorted(now)
        changed = [n for n in names if recorded.get(n) != now.get(n)]
        if not changed:
            return
        flag = lambda name, value: (
            f"options {value}" if name == "options" else f"--{name}={_flag_value(value)}"
        )
        said = "; ".join(
            f"{flag(n, recorded.get(n))} there, {flag(n, now.get(n))} here" for n in changed[:3]
        )
        more = f" ({len(changed) - 3} more)" if len(changed) > 3 else ""
        raise ConfigError(
            f"--model_dir={self.config.model_dir} holds a run trained with other settings "
            f"(recorded in {where}): {said}{more}. Resuming would change that run. Use its "
            "settings to resume it, --restart to start afresh (its files move to "
            "previous/), or a new --model_dir. Nothing was changed."
        )

    def finished_run(self) -> dict | None:
        """The metrics of this run if it already finished (a rerun of the same
        command): said, and left as they are; else None."""
        path = os.path.join(self.config.model_dir, "metrics.json")
        try:
            metrics = json.loads(fileio.read_text(path))
        except (OSError, ValueError):
            return None
        if not isinstance(metrics, dict) or metrics.get("global_step") != self.step:
            return None
        self.log(
            f"This run already finished at step {self.step} of {self.plan.total_steps}: "
            f"nothing to train. Its metrics are in {path}; raise --train_steps or "
            "--epochs to train on."
        )
        return metrics

    # -- the loop --------------------------------------------------------

    def _due_in(self, step: int) -> list[int]:
        """Steps until each action, evaluation and checkpoint is next due."""
        due = [a.steps_until_due(step) for a in self.train_actions]
        due += [every - step % every for every in (self.eval_interval, self.checkpoint_interval)]
        return [d for d in due if d]

    def train(self) -> dict:
        """Trains to the end of the plan; returns the last evaluation."""
        config, plan, mode, parts = self.config, self.plan, self.mode, self.parts
        step = self.step
        iterator = parts.train_iterator or mode.distribute_train(
            inputs.stream(parts.task, config, training=True, start_step=step)
        )
        self.evaluator = mode.evaluator(
            parts.trainer, inputs.stream(parts.task, config, training=False)
        )
        self._announce()
        self.started = time.time()
        if step == 0:  # the starting point, before any update
            self._begin_summaries()
        for action in self.train_actions:
            action.begin(step)
        stretch = config.steps_per_loop * mode.loops_between_syncs
        while step < plan.total_steps:
            n = min(stretch, plan.total_steps - step, *self._due_in(step))
            self.watchdog.kick(f"training steps {step + 1}-{step + n}")
            start = time.time()
            per_loop = config.steps_per_loop
            loops = [min(per_loop, n - first) for first in range(0, n, per_loop)]
            mode.run_steps(parts.trainer, iterator, loops)
            seconds, step = time.time() - start, step + n
            last = step == plan.total_steps
            self._count(step, n, seconds)
            due = [a for a in self.train_actions if a.due(step, last=last)]
            # An output covers the steps since the last one: made when an
            # action is due (every stretch where there is none).
            if due or last or not self.train_actions:
                output = self._train_output(step)
                for action in [*self.train_guards, *due]:
                    action(output)
            if last or step % self.eval_interval == 0:
                self.evaluate(step, timings=True)
            if last or step % self.checkpoint_interval == 0:
                self.watchdog.kick(f"saving the checkpoint of step {step}")
                parts.checkpoints.save(step)
            parts.summaries.flush()
            if step < plan.total_steps and mode.agree_to_stop(self.stop.requested):
                self._stop_early(step)
        if self.stop.requested:
            self.log(
                "The stop signal came during the last stretch of steps: the run "
                "finished them, so it ends as a finished run."
            )
        if self.last_eval is None:  # a finished run resumed: evaluate it
            self.evaluate(step)
        return self.last_eval

    def _count(self, step: int, steps: int, seconds: float) -> None:
        """Counts a stretch: in the window of the next output, and in the
        steady speed unless it is the first (which traces the graph) of several."""
        self.window_steps += steps
        self.window_seconds += seconds
        self.stretches += 1
        if self.stretches > 1 or step == self.plan.total_steps:
            self.seconds += seconds
            self.examples += steps * self.config.batch_size

    def _train_output(self, step: int) -> actions_lib.TrainOutput:
        parts = self.parts
        raw = parts.trainer.take_train_metrics()
        nonfinite = int(raw.pop("nonfinite_steps", 0))
        self.skipped += nonfinite
        names = ["loss", *parts.scorer.metric_names]
        # (Every batch can be skipped under --on_nan=skip_step.)
        metrics = {k: raw[k] for k in names if k in raw} if raw["examples"] else {}
        extra = {k: v for k, v in raw.items() if "/" in k}  # a trainer's own (staleness/...)
        if "gradient_norm" in raw:
            extra["gradient_norm"] = raw["gradient_norm"]
        output = actions_lib.TrainOutput(
            step=step,
            total_steps=self.plan.total_steps,
            steps_per_epoch=self.plan.steps_per_epoch,
            steps=self.window_steps,
            seconds=self.window_seconds,
            global_batch_size=self.config.batch_size,
            metrics=metrics,
            learning_rate=self.learning_rate(),
            extra=extra,
            nonfinite_steps=nonfinite,
            skipped_total=self.skipped,
            histograms=parts.trainer.histograms(),
            steady_speed=self.examples / self.seconds if self.seconds else None,
            started=self.started,
        )
        self.window_steps, self.window_seconds = 0, 0.0
        return output

    def evaluate(self, step: int, timings: bool = False) -> dict:
        """Evaluates on the test split (and, with ``timings``, measures the
        trainer's timings) and hands the result to the eval actions."""
        self.watchdog.kick(f"evaluating at step {step}")
        metrics = self.evaluator()
        if timings:
            self.last_timings = self.parts.trainer.timings()
        names = ["loss", *self.parts.scorer.metric_names]
        scores = {k: metrics[k] for k in names if k in metrics}
        output = actions_lib.EvalOutput(
            step,
            self.plan.total_steps,
            {**scores, "examples": metrics["examples"]},
            self.last_timings if timings else {},
        )
        for action in [*self.eval_actions, *self.eval_guards]:
            action(output)
        if step == 0:
            self.parts.untrained_eval.assign(
                [metrics["loss"], metrics.get("accuracy", float("nan"))]
            )
        self.last_eval = metrics
        return metrics

    def steady_speed(self) -> tuple[float | None, float | None]:
        """(examples/s, seconds) of the stretches trained here; None if none was."""
        if not self.stretches:
            return None, None
        return (self.examples / self.seconds if self.seconds else 0.0), self.seconds

    def _begin_summaries(self) -> None:
        """Step 0 in TensorBoard: the learning rate, the untrained model's
        evaluation, the model's graph and the run's hyperparameters."""
        parts = self.parts
        parts.summaries.scalars("train", 0, {"learning_rate": self.learning_rate()})
        self.evaluate(0)
        if self.mode.placement.is_chief:
            model = parts.model
            spec = export.batch_spec(parts.sample_batch[0])
            forward = tf.function(lambda x: model(x, training=False))
            parts.summaries.graph("train", forward.get_concrete_function(spec).graph)
            placement = self.mode.placement
            parts.summaries.hparams(
                hparams_of(
                    self.config,
                    num_microbatches=self.config.microbatches,
                    num_workers=placement.num_workers,
                    num_replicas=placement.num_replicas,
                    total_steps=self.plan.total_steps,
                )
            )
        parts.summaries.flush()

    def _stop_early(self, step: int) -> None:
        """Saves the step reached (unless just saved) and stops the run."""
        checkpoints = self.parts.checkpoints
        saved = checkpoints.last_saved
        if not saved or not saved.endswith(f"ckpt-{step}"):
            self.watchdog.kick(f"saving the checkpoint of step {step} before stopping")
            saved = checkpoints.save(step)
        signum = self.stop.signum or 15
        kept = os.path.join(checkpoints.folder, os.path.basename(saved))
        self.log(
            f"Stopped at step {step}/{self.plan.total_steps} on request; checkpoint "
            f"{kept}. Run the same command again to resume from it."
        )
        self.watchdog.kick("waiting for every worker to stop")
        self.mode.finish()
        raise Stopped(signum)

    def _announce(self) -> None:
        config, plan, placement = self.config, self.plan, self.mode.placement
        if placement.is_chief:
            write_json_atomically(os.path.join(config.model_dir, "config.json"), config.to_dict())
        model = self.parts.model
        what = (
            f"{config.model} on {config.dataset}"
            if config.builtin_task
            else f"{model.name} ({model.count_params():,} parameters) from "
            f"{type(self.parts.task).__name__}"
        )
        epochs = (
            f"{plan.steps_per_epoch} per epoch"
            if plan.steps_per_epoch
            else "the length of an epoch unknown"
        )
        self.chief_log(
            f"Training {what} with {config.optimizer}, "
            f"{placement.num_replicas} replica(s) on {placement.num_workers} "
            f"worker(s), global batch {config.batch_size}: {plan.total_steps} steps "
            f"({epochs})."
        )
        if config.weight_decay:
            left_out = self.parts.decay_left_out
            decayed = len(model.trainable_variables) - len(left_out)
            self.chief_log(
                f"Weight decay {config.weight_decay:g} on {decayed} of "
                f"{len(model.trainable_variables)} variables; left out: "
                + (", ".join(v.path for v in left_out[:6]) or "none")
                + (f" and {len(left_out) - 6} more" if len(left_out) > 6 else "")
                + "."
            )
        for line in self.mode.announce():
            self.chief_log(line)

    def finish(self, eval_metrics: dict) -> dict:
        """Exports the model and writes metrics.json; returns the metrics."""
        config, placement, parts = self.config, self.mode.placement, self.parts
        export_dir = None
        if config.export:
            self.watchdog.kick("exporting the SavedModel")
            export_dir = export.export_saved_model(
                parts.model, parts.sample_batch[0], self.out.path("export"), log=self.chief_log
            )
        speed, seconds = self.steady_speed()
        task = parts.task
        result = {
            **{
                f"eval_{k}": v
                for k, v in eval_metrics.items()
                if k != "examples" and not k.startswith("staleness/")
            },
            "eval_examples": int(eval_metrics["examples"]),
            "global_step": self.step,
            "examples_per_second": speed,
            "training_seconds": seconds,
            "experiment": config.experiment,
            "task": config.task if config.builtin_task else tasks.task_name(config.task),
            "model": parts.model.name,
            **tasks.call_user(f"{type(task).__name__}.describe", task.describe, config),
            "optimizer": config.optimizer,
            "strategy": config.strategy,
            "num_replicas": placement.num_replicas,
            "num_workers": placement.num_workers,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "weights_sha256": export.weights_fingerprint(parts.model),
            **self.mode.describe(),
        }
        if self.last_timings:
            result["timings"] = self.last_timings
        if config.on_nan == "skip_step":
            result["skipped_steps"] = self.skipped
        self.log(
            f"Final weights sha256 {result['weights_sha256'][:16]} "
            f"(worker {placement.worker_index} of {placement.num_workers})."
        )
        if placement.is_chief:
            metrics_path = os.path.join(config.model_dir, "metrics.json")
            write_json_atomically(metrics_path, result)
            scores = ", ".join(
                f"eval {k} {eval_metrics[k]:.4f}"
                for k in [*parts.scorer.metric_names, "loss"]
                if k in eval_metrics
            )
            self.log(
                f"Done: step {result['global_step']}, {scores}"
                + (
                    f", {result['examples_per_second']:,.0f} examples/s. "
                    if result["examples_per_second"] is not None
                    else ". "
                )
                + (f"Model exported to {export_dir}; " if export_dir else "")
                + f"metrics in {metrics_path}."
            )
        return result


def _flag_value(value) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if value is None:
        return "(unset)"
    return str(value)


def run(
    config: ExperimentConfig,
    mode: ParallelMode,
    *,
    log: Callable[[str], None] = print,
    watchdog=None,
    stop=None,
    train_actions=None,
    eval_actions=None,
) -> dict:
    """Trains, evaluates and exports one run under a set-up mode; returns
    what metrics.json holds.

    ``train_actions``/``eval_actions``: in place of the default ones
    (actions.default_actions), each called with every TrainOutput/EvalOutput.

    Raises:
      ConfigError, data_lib.DataError, RunError: for mistakes the user can fix.
      stopping.Stopped: a signal stopped the run, after a checkpoint was saved.
    """
    keras.utils.set_random_seed(config.seed)
    task = tasks.from_config(config)
    check_data = getattr(task, "check_data", None)  # the built-in task's own checks
    if callable(check_data):
        check_data(config)
    probe = inputs.probe(task, config)
    plan = Plan.make(config, task, probe)
    placement = mode.placement
    with _Output(config.model_dir, placement.is_chief, placement.worker_index) as out:
        watchdog = watchdog or NoWatchdog()
        parts = build_components(config, mode, plan, task, probe, out, log, watchdog)
        controller = Controller(
            config=config,
            mode=mode,
            plan=plan,
            parts=parts,
            out=out,
            log=log,
            watchdog=watchdog,
            stop=stop,
            train_actions=train_actions,
            eval_actions=eval_actions,
        )
        # Only now: a task, model or data that does not fit is refused before
        # anything is written.
        fileio.makedirs(config.model_dir)
        step = controller.restore()
        if step >= plan.total_steps:
            # The chief decides whether the run already finished (it reads
            # metrics.json); every task of a cluster takes its word, so all
            # leave, or all go on to the end, together.
            done = controller.finished_run() if placement.is_chief else None
            watchdog.kick("agreeing whether the run already finished")
            if mode.agree_to_stop(done is not None):
                mode.finish()
                return done if done is not None else {"global_step": step}
        result = controller.finish(controller.train())
        controller.watchdog.kick("waiting for every worker to finish")
        mode.finish()
        return result

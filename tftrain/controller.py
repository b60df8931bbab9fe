"""The outer loop: data, model, restore, train loops, evaluation, checkpoints,
summaries, export and ``metrics.json`` for one run.

Only the chief writes into ``model_dir``. Other workers take part in every
save (variable reads can be collective) but write to a temporary folder
that they delete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from tftrain import data as data_lib
from tftrain import models, optimizers
from tftrain.config import ExperimentConfig, check_batch_splits
from tftrain.distribute.strategies import Placement, sum_over_workers
from tftrain.distribute.watchdog import NoWatchdog
from tftrain.trainer import Trainer


class RunError(RuntimeError):
    """A run that cannot go on, for a reason the user can act on."""


def _format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _write_json_atomically(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def weights_fingerprint(model) -> str:
    """SHA-256 of the model's weights, bit for bit: equal on every worker."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def build_optimizer(config: ExperimentConfig, steps_per_epoch: int, total_steps: int):
    """tftrain's optimizer for the config, with its learning-rate schedule."""
    peak = config.learning_rate
    if config.scale_lr_with_batch:
        peak = optimizers.scaled_learning_rate(peak, config.batch_size, config.base_batch_size)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "constant" and warmup == 0:
        learning_rate = peak
    else:
        learning_rate = optimizers.WarmupDecay(
            peak,
            warmup_steps=warmup,
            decay=config.lr_schedule,
            total_steps=total_steps,
            boundaries=[int(round(e * steps_per_epoch)) for e in config.lr_decay_epochs],
            decay_rate=config.lr_decay_rate,
        )
    kwargs = {"learning_rate": learning_rate}
    if config.momentum is not None and config.optimizer in ("sgd", "momentum"):
        kwargs["momentum"] = config.momentum
    return optimizers.get(config.optimizer, **kwargs)


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


def _export(model, image_shape, out: _Output) -> str:
    """Writes a SavedModel whose ``serving_default`` maps images to logits."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name="images")],
    )
    final = out.path("export")
    staging = final + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        archive.write_out(staging, verbose=False)  # it prints a long listing
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains on and for how long, decided before any variable exists."""

    dataset: data_lib.Dataset
    train: data_lib.Split
    test: data_lib.Split
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, config: ExperimentConfig, num_replicas: int) -> Plan:
        check_batch_splits(config.batch_size, num_replicas)
        dataset = data_lib.load(config.dataset, config.data_dir, seed=config.seed)
        train = dataset.train.take(config.max_train_examples)
        test = dataset.test.take(config.max_eval_examples)
        per_epoch = data_lib.steps_per_epoch(len(train), config.batch_size)
        total = config.train_steps or config.epochs * per_epoch
        return cls(dataset, train, test, per_epoch, total)


class Controller:
    """One run's outer loop, in the order ``restore``, ``train``, ``finish``.

    Args:
      config: the validated config.
      placement: the strategy and this task's place in the cluster.
      plan: the data and the length of the run.
      out: where this task writes.
      log: prints a line for the person watching.
      watchdog: told what the run does next, before each stage that can block.
    """

    def __init__(self, *, config, placement: Placement, plan: Plan, out: _Output, log, watchdog):
        self.config, self.placement, self.plan = config, placement, plan
        self.out, self.log, self.watchdog = out, log, watchdog
        strategy = placement.strategy
        watchdog.kick("creating the model's variables (all workers must join)")
        with strategy.scope():
            self.model = models.build_model(
                config.model,
                input_shape=plan.dataset.image_shape,
                num_classes=plan.dataset.num_classes,
                seed=config.seed,
                hidden_units=config.hidden_units,
            )
            self.optimizer = build_optimizer(config, plan.steps_per_epoch, plan.total_steps)
            self.optimizer.build(self.model.trainable_variables)
        self.trainer = Trainer(
            strategy=strategy,
            model=self.model,
            optimizer=self.optimizer,
            global_batch_size=config.batch_size,
            gradient_reducer=placement.gradient_reducer,
        )
        # The global step is also the data position: the stream is a function of it.
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, global_step=self.trainer.global_step
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            out.path("checkpoints"),
            max_to_keep=config.keep_checkpoints,
            step_counter=self.trainer.global_step,
        )

    @property
    def step(self) -> int:
        return int(self.trainer.global_step.numpy())

    def restore(self) -> int:
        """Restores the latest checkpoint in model_dir, if any; returns the step."""
        shared = os.path.join(self.config.model_dir, "checkpoints")
        latest = tf.train.latest_checkpoint(shared)
        self.watchdog.kick("restoring the latest checkpoint")
        if latest:
            try:
                self.checkpoint.restore(latest).assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.OpError) as e:
                raise RunError(
                    f"--model_dir={self.config.model_dir} holds a checkpoint ({latest}) "
                    "that does not fit this run's model or optimizer "
                    f"({str(e).splitlines()[0]}). Expected the same --model/--optimizer "
                    "as the run that wrote it, or a new --model_dir. Nothing was changed."
                ) from None
            self.log(f"Resumed from {latest} at step {self.step}.")
        return self.step

    def _writers(self):
        if self.placement.is_chief:
            _write_json_atomically(
                os.path.join(self.config.model_dir, "config.json"), self.config.to_dict()
            )
            return (
                tf.summary.create_file_writer(self.out.path("train")),
                tf.summary.create_file_writer(self.out.path("eval")),
            )
        noop = tf.summary.create_noop_writer()
        return noop, noop

    def train(self) -> dict:
        """Trains to the end of the plan; returns the last evaluation."""
        config, plan, strategy = self.config, self.plan, self.placement.strategy
        step = self.step
        iterator = iter(self._distributed_train_data(step))
        self._eval_ds = strategy.experimental_distribute_dataset(
            data_lib.eval_dataset(plan.test, batch_size=config.eval_batch_size)
        )
        train_writer, self._eval_writer = self._writers()
        eval_every = config.eval_interval or plan.steps_per_epoch
        ckpt_every = config.checkpoint_interval or plan.steps_per_epoch
        self.log(
            f"Training {config.model} on {plan.dataset.name} ({len(plan.train)} train / "
            f"{len(plan.test)} test examples) with {config.optimizer}, "
            f"{self.placement.num_replicas} replica(s) on {self.placement.num_workers} "
            f"worker(s), global batch {config.batch_size}: {plan.total_steps} steps "
            f"({plan.steps_per_epoch} per epoch)."
        )
        progress = _Progress(self, train_writer)
        eval_metrics = None
        while step < plan.total_steps:
            # Stop each loop at the next evaluation or checkpoint boundary.
            n = min(
                config.steps_per_loop,
                plan.total_steps - step,
                eval_every - step % eval_every,
                ckpt_every - step % ckpt_every,
            )
            self.watchdog.kick(f"training steps {step + 1}-{step + n}")
            start = time.time()
            self.trainer.train(iterator, n)
            metrics = self.trainer.take_train_metrics()  # a read: waits for the loop
            step += n
            progress.record(step, n, time.time() - start, metrics)
            if step % eval_every == 0 or step == plan.total_steps:
                eval_metrics = self.evaluate(step)
            if step % ckpt_every == 0 or step == plan.total_steps:
                self.save(step)
            train_writer.flush()
        self.examples_per_second, self.training_seconds = progress.steady_speed()
        return eval_metrics or self.evaluate(step)  # a finished run resumed: evaluate it

    def _distributed_train_data(self, step: int):
        config, plan, strategy = self.config, self.plan, self.placement.strategy
        if self.placement.num_workers > 1 and strategy.num_replicas_in_sync == (
            self.placement.num_workers
        ):
            # One replica per worker: each worker builds the stream of its own
            # slice of every global batch, and gathers only those examples.
            def per_worker(context):
                return data_lib.train_dataset(
                    plan.train,
                    global_batch_size=config.batch_size,
                    seed=config.seed,
                    start_step=step,
                    num_shards=context.num_input_pipelines,
                    shard_index=context.input_pipeline_id,
                )

            return strategy.distribute_datasets_from_function(per_worker)
        train_ds = data_lib.train_dataset(
            plan.train, global_batch_size=config.batch_size, seed=config.seed, start_step=step
        )
        return strategy.experimental_distribute_dataset(train_ds)

    def evaluate(self, step: int) -> dict:
        self.watchdog.kick(f"evaluating at step {step}")
        metrics = self.trainer.evaluate(self._eval_ds)
        with self._eval_writer.as_default(step=step):
            tf.summary.scalar("loss", metrics["loss"])
            tf.summary.scalar("accuracy", metrics["accuracy"])
        self._eval_writer.flush()
        self.log(
            f"eval at step {step}: loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}"
        )
        return metrics

    def save(self, step: int) -> None:
        self.watchdog.kick(f"saving the checkpoint of step {step}")
        saved = self.manager.save(checkpoint_number=step)
        if not self.placement.is_chief:  # every worker saves; only the chief keeps it
            shutil.rmtree(os.path.dirname(saved), ignore_errors=True)

    def finish(self, eval_metrics: dict) -> dict:
        """Exports the model and writes metrics.json; returns the metrics."""
        config, placement = self.config, self.placement
        export_dir = None
        if config.export:
            self.watchdog.kick("exporting the SavedModel")
            export_dir = _export(self.model, self.plan.dataset.image_shape, self.out)
        result = {
            "eval_accuracy": eval_metrics["accuracy"],
            "eval_loss": eval_metrics["loss"],
            "eval_examples": int(eval_metrics["examples"]),
            "global_step": self.step,
            "examples_per_second": self.examples_per_second,
            "training_seconds": self.training_seconds,
            "experiment": config.experiment,
            "dataset": self.plan.dataset.name,
            "model": config.model,
            "optimizer": config.optimizer,
            "strategy": config.strategy,
            "num_replicas": placement.num_replicas,
            "num_workers": placement.num_workers,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "weights_sha256": weights_fingerprint(self.model),
        }
        self.log(
            f"Final weights sha256 {result['weights_sha256'][:16]} "
            f"(worker {placement.worker_index} of {placement.num_workers})."
        )
        if placement.is_chief:
            metrics_path = os.path.join(config.model_dir, "metrics.json")
            _write_json_atomically(metrics_path, result)
            self.log(
                f"Done: step {result['global_step']}, eval accuracy "
                f"{result['eval_accuracy']:.4f}, eval loss {result['eval_loss']:.4f}, "
                f"{result['examples_per_second']:,.0f} examples/s. "
                + (f"Model exported to {export_dir}; " if export_dir else "")
                + f"metrics in {metrics_path}."
            )
        return result


class _Progress:
    """Training speed, TensorBoard train scalars and the console's progress lines.

    The steady speed leaves out the first loop, which traces the graph, unless
    it is the only one.
    """

    def __init__(self, controller: Controller, writer):
        self.c, self.writer = controller, writer
        self.seconds, self.examples, self.loops = 0.0, 0, 0
        self.started, self.last_line = time.time(), 0.0

    def steady_speed(self) -> tuple[float, float]:
        return (self.examples / self.seconds if self.seconds else 0.0), self.seconds

    def record(self, step: int, n: int, elapsed: float, metrics: dict) -> None:
        config, plan = self.c.config, self.c.plan
        self.loops += 1
        if self.loops > 1 or step == plan.total_steps:
            self.seconds += elapsed
            self.examples += n * config.batch_size
        speed = (
            self.examples / self.seconds
            if self.seconds
            else n * config.batch_size / max(elapsed, 1e-9)
        )
        lr = float(tf.convert_to_tensor(self.c.optimizer.learning_rate).numpy())
        with self.writer.as_default(step=step):
            tf.summary.scalar("loss", metrics["loss"])
            tf.summary.scalar("accuracy", metrics["accuracy"])
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("examples_per_second", speed)
        now = time.time()
        boundary = step % plan.steps_per_epoch == 0 or step == plan.total_steps
        if now - self.last_line < config.log_interval_secs and not boundary:
            return
        self.last_line = now
        eta = (plan.total_steps - step) * config.batch_size / max(speed, 1e-9)
        epochs = math.ceil(plan.total_steps / plan.steps_per_epoch)
        self.c.log(
            f"step {step}/{plan.total_steps}  epoch {step / plan.steps_per_epoch:.2f}/{epochs}  "
            f"loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  "
            f"lr {lr:.3g}  {speed:,.0f} examples/s  "
            f"elapsed {_format_duration(now - self.started)}  ETA {_format_duration(eta)}"
        )


def run(
    config: ExperimentConfig,
    placement: Placement,
    *,
    log: Callable[[str], None] = print,
    watchdog=None,
) -> dict:
    """Trains, evaluates and exports one run; returns what metrics.json holds.

    Raises:
      ConfigError, data_lib.DataError, RunError: for mistakes the user can fix.
    """
    keras.utils.set_random_seed(config.seed)
    plan = Plan.make(config, placement.num_replicas)
    os.makedirs(config.model_dir, exist_ok=True)
    with _Output(config.model_dir, placement.is_chief, placement.worker_index) as out:
        controller = Controller(
            config=config,
            placement=placement,
            plan=plan,
            out=out,
            log=log,
            watchdog=watchdog or NoWatchdog(),
        )
        controller.restore()
        result = controller.finish(controller.train())
        if placement.num_workers > 1:
            # A worker that exits while the chief still exports is reported by
            # TensorFlow's coordination service as a crashed task, and the
            # chief waits for it: leave together.
            controller.watchdog.kick("waiting for every worker to finish")
            sum_over_workers(placement.strategy, tf.constant(1.0))  # a barrier
        return result

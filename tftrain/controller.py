"""The outer loop: data, model, restore, train loops, evaluation, checkpoints,
summaries, export and ``metrics.json`` for one run.

Only the chief writes into ``model_dir``. Other workers take part in every
save (variable reads can be collective) but write to a temporary folder
that they delete.
"""

from __future__ import annotations

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
from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute.strategies import Placement
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
    elsewhere (deleted at the end)."""

    def __init__(self, model_dir: str, is_chief: bool, worker_index: int):
        self.model_dir = model_dir
        self.is_chief = is_chief
        self._scratch = (
            None if is_chief else tempfile.mkdtemp(prefix=f"tftrain_worker{worker_index}_")
        )

    def path(self, *parts: str) -> str:
        return os.path.join(self._scratch or self.model_dir, *parts)

    def close(self) -> None:
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
    with open(os.devnull, "w") as devnull:  # ExportArchive prints a long listing
        import contextlib

        with contextlib.redirect_stdout(devnull):
            archive.write_out(staging, verbose=False)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


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
    replicas = placement.num_replicas
    if config.batch_size % replicas:
        raise ConfigError(
            f"--batch_size={config.batch_size} does not split evenly over "
            f"{replicas} replicas: expected a multiple of {replicas}."
        )
    keras.utils.set_random_seed(config.seed)
    dataset = data_lib.load(config.dataset, config.data_dir, seed=config.seed)
    train_split = dataset.train.take(config.max_train_examples)
    test_split = dataset.test.take(config.max_eval_examples)
    per_epoch = data_lib.steps_per_epoch(len(train_split), config.batch_size)
    if per_epoch == 0:
        raise ConfigError(
            f"--batch_size={config.batch_size} is larger than the "
            f"{len(train_split)} training examples."
        )
    total_steps = config.train_steps or config.epochs * per_epoch
    os.makedirs(config.model_dir, exist_ok=True)
    out = _Output(config.model_dir, placement.is_chief, placement.worker_index)
    try:
        return _run(
            config,
            placement,
            dataset,
            train_split,
            test_split,
            per_epoch,
            total_steps,
            out,
            log,
            watchdog or NoWatchdog(),
        )
    finally:
        out.close()


def _run(
    config,
    placement,
    dataset,
    train_split,
    test_split,
    per_epoch,
    total_steps,
    out: _Output,
    log,
    watchdog,
) -> dict:
    strategy = placement.strategy
    watchdog.kick("creating the model's variables (all workers must join)")
    with strategy.scope():
        model = models.build_model(
            config.model,
            input_shape=dataset.image_shape,
            num_classes=dataset.num_classes,
            seed=config.seed,
            hidden_units=config.hidden_units,
        )
        optimizer = build_optimizer(config, per_epoch, total_steps)
        optimizer.build(model.trainable_variables)
    trainer = Trainer(
        strategy=strategy, model=model, optimizer=optimizer, global_batch_size=config.batch_size
    )

    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, global_step=trainer.global_step
    )
    shared_dir = os.path.join(config.model_dir, "checkpoints")
    manager = tf.train.CheckpointManager(
        checkpoint,
        out.path("checkpoints"),
        max_to_keep=config.keep_checkpoints,
        step_counter=trainer.global_step,
    )
    latest = tf.train.latest_checkpoint(shared_dir)
    watchdog.kick("restoring the latest checkpoint")
    if latest:
        try:
            checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            raise RunError(
                f"--model_dir={config.model_dir} holds a checkpoint ({latest}) that "
                f"does not fit this run's model or optimizer ({str(e).splitlines()[0]}). "
                "Expected the same --model/--optimizer as the run that wrote it, or a "
                "new --model_dir. Nothing was changed."
            ) from None
        log(f"Resumed from {latest} at step {int(trainer.global_step.numpy())}.")
    start_step = int(trainer.global_step.numpy())

    if placement.is_chief:
        _write_json_atomically(os.path.join(config.model_dir, "config.json"), config.to_dict())
        train_writer = tf.summary.create_file_writer(out.path("train"))
        eval_writer = tf.summary.create_file_writer(out.path("eval"))
    else:
        train_writer = eval_writer = tf.summary.create_noop_writer()

    train_ds = data_lib.train_dataset(
        train_split, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step
    )
    iterator = iter(strategy.experimental_distribute_dataset(train_ds))
    eval_ds = strategy.experimental_distribute_dataset(
        data_lib.eval_dataset(test_split, batch_size=config.eval_batch_size)
    )

    eval_every = config.eval_interval or per_epoch
    ckpt_every = config.checkpoint_interval or per_epoch
    total_epochs = math.ceil(total_steps / per_epoch)
    log(
        f"Training {config.model} on {dataset.name} ({len(train_split)} train / "
        f"{len(test_split)} test examples) with {config.optimizer}, "
        f"{placement.num_replicas} replica(s) on {placement.num_workers} worker(s), "
        f"global batch {config.batch_size}: {total_steps} steps "
        f"({per_epoch} per epoch)."
    )

    step = start_step
    train_time, timed_examples, first_loop = 0.0, 0, True
    last_log = 0.0
    run_start = time.time()
    eval_metrics = None
    while step < total_steps:
        # Stop each loop at the next evaluation or checkpoint boundary.
        n = min(
            config.steps_per_loop,
            total_steps - step,
            eval_every - step % eval_every,
            ckpt_every - step % ckpt_every,
        )
        watchdog.kick(f"training steps {step + 1}-{step + n}")
        t0 = time.time()
        trainer.train(iterator, n)
        metrics = trainer.take_train_metrics()  # reads: waits for the loop
        elapsed = time.time() - t0
        step += n
        if not first_loop or step == total_steps:
            train_time += elapsed
            timed_examples += n * config.batch_size
        first_loop = False
        speed = (
            timed_examples / train_time
            if train_time
            else n * config.batch_size / max(elapsed, 1e-9)
        )
        lr = float(tf.convert_to_tensor(optimizer.learning_rate).numpy())
        with train_writer.as_default(step=step):
            tf.summary.scalar("loss", metrics["loss"])
            tf.summary.scalar("accuracy", metrics["accuracy"])
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("examples_per_second", speed)
        epoch_done = step % per_epoch == 0
        now = time.time()
        if now - last_log >= config.log_interval_secs or epoch_done or step == total_steps:
            last_log = now
            eta = (total_steps - step) * config.batch_size / max(speed, 1e-9)
            log(
                f"step {step}/{total_steps}  epoch {step / per_epoch:.2f}/{total_epochs}  "
                f"loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  "
                f"lr {lr:.3g}  {speed:,.0f} examples/s  "
                f"elapsed {_format_duration(now - run_start)}  ETA {_format_duration(eta)}"
            )
        if step % eval_every == 0 or step == total_steps:
            watchdog.kick(f"evaluating at step {step}")
            eval_metrics = trainer.evaluate(eval_ds)
            with eval_writer.as_default(step=step):
                tf.summary.scalar("loss", eval_metrics["loss"])
                tf.summary.scalar("accuracy", eval_metrics["accuracy"])
            log(
                f"eval at step {step}: loss {eval_metrics['loss']:.4f}  "
                f"accuracy {eval_metrics['accuracy']:.4f}"
            )
        if step % ckpt_every == 0 or step == total_steps:
            watchdog.kick(f"saving the checkpoint of step {step}")
            saved = manager.save(checkpoint_number=step)
            if not placement.is_chief:
                shutil.rmtree(os.path.dirname(saved), ignore_errors=True)
        train_writer.flush()
        eval_writer.flush()

    if eval_metrics is None:  # resumed a finished run: evaluate what it left
        watchdog.kick("evaluating")
        eval_metrics = trainer.evaluate(eval_ds)
    export_dir = None
    if config.export:
        watchdog.kick("exporting the SavedModel")
        export_dir = _export(model, dataset.image_shape, out)
    result = {
        "eval_accuracy": eval_metrics["accuracy"],
        "eval_loss": eval_metrics["loss"],
        "eval_examples": int(eval_metrics["examples"]),
        "global_step": int(trainer.global_step.numpy()),
        "examples_per_second": timed_examples / train_time if train_time else 0.0,
        "training_seconds": train_time,
        "experiment": config.experiment,
        "dataset": dataset.name,
        "model": config.model,
        "optimizer": config.optimizer,
        "strategy": config.strategy,
        "num_replicas": placement.num_replicas,
        "num_workers": placement.num_workers,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "weights_sha256": weights_fingerprint(model),
    }
    log(
        f"Final weights sha256 {result['weights_sha256'][:16]} "
        f"(worker {placement.worker_index} of {placement.num_workers})."
    )
    if placement.is_chief:
        _write_json_atomically(os.path.join(config.model_dir, "metrics.json"), result)
        log(
            f"Done: step {result['global_step']}, eval accuracy "
            f"{result['eval_accuracy']:.4f}, eval loss {result['eval_loss']:.4f}, "
            f"{result['examples_per_second']:,.0f} examples/s. "
            + (f"Model exported to {export_dir}; " if export_dir else "")
            + f"metrics in {os.path.join(config.model_dir, 'metrics.json')}."
        )
    return result

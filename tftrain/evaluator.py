"""The ``evaluator`` task: evaluates each new checkpoint beside the training
cluster, in its own process, and writes its own TensorBoard run
(``model_dir/evaluator``) and ``model_dir/evaluator/metrics.json``.

It reads only the model's weights and the step from each checkpoint, so it
never holds up training; a checkpoint rotated away before it could be read
is skipped with a line. It ends, exit 0, once the chief has been gone for a
few seconds and the newest checkpoint has been evaluated; exit 1 if the
chief never appeared within ``--collective_timeout_secs``.
"""

from __future__ import annotations

import os
import signal
import sys

import keras
import tensorflow as tf

from tftrain import fileio, inputs, lifeline, tasks
from tftrain.controller import _Output, set_precision, write_json_atomically
from tftrain.distribute import serving
from tftrain.summaries import Summaries
from tftrain.trainer import Trainer


def run(config, cluster, log=print) -> int:
    # The chief decides when the run ends; a SIGTERM to the whole cluster must
    # not stop the evaluator before the last checkpoint is evaluated.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keras.utils.set_random_seed(config.seed)
    task = tasks.from_config(config)
    batch = inputs.first_batch(task, config, training=False)
    set_precision(config.precision)
    model = tasks.call_user(f"{type(task).__name__}.build_model", task.build_model, config)
    if not model.built or not model.weights:
        model(batch[0])
    scorer = tasks.build_scorer(task, config, model, batch)
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    reader = tf.train.Checkpoint(model=model, global_step=step)
    trainer = Trainer(
        strategy=tf.distribute.get_strategy(),
        scorer=scorer,
        model=model,
        optimizer=None,
        global_batch_size=config.eval_batch_size,
    )
    eval_data = inputs.stream(task, config, training=False)(None)
    folder = os.path.join(config.model_dir, "checkpoints")
    chief = serving.Driver(cluster, config.collective_timeout_secs)
    log(f"evaluator: waiting for checkpoints in {folder}.")
    fileio.makedirs(os.path.join(config.model_dir, "evaluator"))
    with _Output(config.model_dir, True, 0) as out:
        summaries, evaluated = Summaries(out, True), []
        for path in tf.train.checkpoints_iterator(
            folder,
            min_interval_secs=0.5,
            timeout=1.0,
            timeout_fn=lambda: chief.poll() in ("gone", "missing"),
        ):
            try:
                reader.read(path).expect_partial()
            except (tf.errors.NotFoundError, tf.errors.DataLossError) as e:
                log(f"evaluator: skipped {path} ({type(e).__name__}: it was rotated away).")
                continue
            metrics = trainer.evaluate(eval_data, in_replica=False)
            at = int(step.numpy())
            scores = {k: metrics[k] for k in ["loss", *scorer.metric_names] if k in metrics}
            summaries.scalars("evaluator", at, scores)
            summaries.flush()
            evaluated.append({"step": at, **scores})
            log(f"evaluator: step {at}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if not chief.seen:
            lifeline.say(f"tftrain: error: {chief.never_came()}", file=sys.stderr)
            return 1
        write_json_atomically(
            os.path.join(config.model_dir, "evaluator", "metrics.json"),
            {"evaluated": evaluated, **(evaluated[-1] if evaluated else {})},
        )
        log(f"evaluator: the chief is done; evaluated {len(evaluated)} checkpoint(s).")
        return 0

"""Time to accuracy: how long tftrain and Keras ``model.fit`` take to reach a
test accuracy, each as a user runs it.

Both train the ``fashion_mnist_cnn`` experiment's model with its optimizer
(Adam at 1e-3, cosine decay to 0 over 12 epochs, batch 100) and evaluate on
the whole test split after every epoch. The clock starts when the process
is started (imports and data loading included, for both) and stops when an
evaluation line reports the target accuracy; the process is then stopped
(tftrain by SIGTERM, which it answers by saving a checkpoint; ``fit`` by
its own callback). Peak resident memory comes from ``wait4``.

Used by ``python -m benchmarks`` (its ``time_to_accuracy`` section).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT

TARGET = 0.91
EPOCHS = 12
BATCH = 100
LEARNING_RATE = 1e-3
RUNNERS = ("tftrain", "fit", "tftrain bf16")
# A line that reports an evaluation: tftrain's own, and the fit child's.
EVAL_LINE = re.compile(r"^eval at (?:step|epoch) (\d+): .*accuracy ([0-9.]+)")


def _fit_child(precision: str) -> None:
    """Keras 3 model.fit on the experiment's model, printing an evaluation
    line after every epoch and stopping once the target is reached."""
    import keras

    from tftrain import data, models

    if precision == "bfloat16":
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    dataset = data.load("fashion_mnist")
    keras.utils.set_random_seed(0)
    model = models.build_model("cnn", input_shape=(28, 28, 1), num_classes=10, seed=0)
    per_epoch = len(dataset.train) // BATCH
    schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, EPOCHS * per_epoch)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            accuracy = logs["val_accuracy"]
            print(f"eval at epoch {epoch + 1}: accuracy {accuracy:.4f}", flush=True)
            if accuracy >= TARGET:
                self.model.stop_training = True

    usable = per_epoch * BATCH
    model.fit(
        dataset.train.images[:usable],
        dataset.train.labels[:usable],
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=True,
        verbose=0,
        validation_data=(dataset.test.images, dataset.test.labels),
        validation_batch_size=1000,
        callbacks=[Report()],
    )


def command(runner: str, model_dir: str) -> list[str]:
    if runner == "fit":
        return [sys.executable, "-m", "benchmarks.time_to_accuracy", "--fit", "float32"]
    flags = [
        "train",
        "--experiment=fashion_mnist_cnn",
        "--noexport",
        f"--model_dir={model_dir}",
    ]
    if runner == "tftrain bf16":
        flags.append("--precision=bfloat16")
    return [sys.executable, "-m", "tftrain", *flags]


def measure(runner: str) -> dict:
    """Seconds from start to the evaluation that reached ``TARGET`` (inf when
    no evaluation did), the epoch it came at, and the peak RSS in MiB."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    with tempfile.TemporaryDirectory() as model_dir:
        start = time.perf_counter()
        process = subprocess.Popen(
            command(runner, model_dir),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seconds, epoch, tail = math.inf, None, []
        for line in process.stdout:
            tail = (tail + [line])[-40:]
            found = EVAL_LINE.match(line.strip())
            if found and float(found.group(2)) >= TARGET:
                seconds = time.perf_counter() - start
                epoch = int(found.group(1))
                if runner != "fit":
                    epoch //= 600  # tftrain's line names the step: 600 steps an epoch
                    process.send_signal(signal.SIGTERM)
                break
        process.stdout.read()  # drain what it says while it stops
        _, status, usage = os.wait4(process.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 128 + signal.SIGTERM) or (code and epoch is None):
            raise SystemExit(f"{runner} failed (exit {code}):\n{''.join(tail)}")
    return {"seconds": seconds, "epoch": epoch, "rss": usage.ru_maxrss / 1024}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fit"]:
        _fit_child(sys.argv[2])

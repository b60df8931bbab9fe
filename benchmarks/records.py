"""Streaming a large TFRecord dataset: peak memory and input rate.

``python -m benchmarks.records [--gigabytes=3] [--folder=DIR]`` writes
``--gigabytes`` of ``tf.train.Example`` records (32x32x3 uint8 images and a
label, CIFAR-sized, in 32 shards) unless the folder already holds them, then

1. reads them through ``tftrain.data.tfrecords`` alone, as a task's
   ``build_inputs`` would for training (shuffled, parsed, decoded), and
   prints its examples/s;
2. trains a small convnet on them with ``tftrain train`` (an experiment file
   written beside the records), one full pass, and prints the run's
   examples/s and its process's peak resident memory.

``--fashion_mnist`` instead writes Fashion-MNIST's IDX files as TFRecord
shards and trains tftrain's CNN on them as ``fashion_mnist_cnn`` trains on
the IDX files (their accuracy over seeds 0-2: 0.9276-0.9318).

The figures: the input pipeline's rate over the model's, and the peak
memory against the 2 GiB bar, with the records' size beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.common import run

IMAGE = (32, 32, 3)
SHARDS = 32
RECORD_BYTES = 3072 + 40  # an image, a label and the framing


EXPERIMENT = """
import os
import keras
import tensorflow as tf
import tftrain

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def decode(parsed):
    images = tf.io.decode_raw(parsed["image"], tf.uint8)
    return tf.reshape(images, [-1, 32, 32, 3]), parsed["label"]


class Records(tftrain.Task):
    def build_model(self, config):
        inputs = keras.Input((32, 32, 3), dtype="uint8")
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
        x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(10)(x))
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        return model

    def build_inputs(self, config, context, training):
        pattern = os.path.join(config.data_dir, "train-*" if training else "test-*")
        return tftrain.data.tfrecords(pattern, FEATURES, decode=decode, config=config,
                                      context=context, training=training)


def get_config(variant=None):
    return tftrain.ExperimentConfig(task=Records, batch_size=256, steps_per_loop=50,
                                    eval_batch_size=1000)
"""


def write_records(folder: str, gigabytes: float) -> int:
    import numpy as np
    import tensorflow as tf

    total = int(gigabytes * 1e9 / RECORD_BYTES)
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f"train-{total}.done")
    if os.path.exists(marker):
        return total
    rng = np.random.default_rng(0)
    start = time.time()
    for split, n, shards in (("train", total, SHARDS), ("test", 10_000, 1)):
        per = -(-n // shards)
        for s in range(shards):
            path = os.path.join(folder, f"{split}-{s:03d}-of-{shards:03d}.tfrecord")
            count = min(per, n - s * per)
            images = rng.integers(0, 256, (count, *IMAGE), dtype=np.uint8)
            labels = rng.integers(0, 10, count)
            with tf.io.TFRecordWriter(path) as writer:
                for image, label in zip(images, labels):
                    example = tf.train.Example(
                        features=tf.train.Features(
                            feature={
                                "image": tf.train.Feature(
                                    bytes_list=tf.train.BytesList(value=[image.tobytes()])
                                ),
                                "label": tf.train.Feature(
                                    int64_list=tf.train.Int64List(value=[int(label)])
                                ),
                            }
                        )
                    )
                    writer.write(example.SerializeToString())
    open(marker, "w").close()
    print(f"wrote {total:,} records in {time.time() - start:.0f} s", flush=True)
    return total


def pipeline_rate(folder: str, batches: int) -> float:
    """Examples/s of the training stream alone (parsed and decoded batches)."""
    import importlib.util

    import tensorflow as tf

    from tftrain import inputs

    spec = importlib.util.spec_from_file_location("records_exp", os.path.join(folder, "exp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config().replace(data_dir=folder, model_dir=folder)
    ds = inputs.stream(module.Records(), config, training=True)(None)
    it = iter(ds)
    for _ in range(100):  # warm up the readers (and tf.data's autotuning)
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
    tf.debugging.assert_equal(tf.shape(x)[0], config.batch_size)
    return batches * config.batch_size / (time.perf_counter() - start)


def reading_rates(folder: str, records: int = 400_000) -> dict[str, float]:
    """Records/s of the training files read two ways, nothing else done:
    one record per tf.data element (then batched by 256), and 256 records
    of a file per element (as tftrain.data.tfrecords reads them)."""
    import glob

    import tensorflow as tf

    names = tf.data.Dataset.from_tensor_slices(sorted(glob.glob(f"{folder}/train-*.tfrecord")))

    def interleaved(read):
        return names.interleave(
            read, cycle_length=8, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    streams = {
        "one record per element": interleaved(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20)
        ).batch(256),
        "256 records of a file per element": interleaved(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20).batch(256)
        ),
    }
    rates = {}
    for name, ds in streams.items():
        it = iter(ds.prefetch(tf.data.AUTOTUNE))
        for _ in range(50):
            next(it)
        start, seen = time.perf_counter(), 0
        while seen < records:
            seen += int(next(it).shape[0])
        rates[name] = seen / (time.perf_counter() - start)
    return rates


FASHION_EXPERIMENT = '''
import os
import tensorflow as tf
import tftrain
from tftrain import models


def decode(parsed):
    images = tf.io.decode_raw(parsed["image"], tf.uint8)
    return tf.reshape(images, [-1, 28, 28, 1]), parsed["label"]


class FashionRecords(tftrain.Task):
    """tftrain's CNN, fed from TFRecord shards instead of the IDX files."""

    def build_model(self, config):
        return models.cnn(input_shape=(28, 28, 1), num_classes=10, seed=config.seed)

    def build_inputs(self, config, context, training):
        pattern = os.path.join(config.data_dir, "train-*" if training else "test-*")
        features = {"image": tf.io.FixedLenFeature([], tf.string),
                    "label": tf.io.FixedLenFeature([], tf.int64)}
        return tftrain.data.tfrecords(pattern, features, decode=decode, config=config,
                                      context=context, training=training,
                                      shuffle_buffer=60_000)

    def build_loss(self, config):
        import keras
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def build_metrics(self, config):
        return ["accuracy"]


def get_config(variant=None):
    # As experiments/fashion_mnist_cnn.py.
    return tftrain.ExperimentConfig(task=FashionRecords, optimizer="adam", learning_rate=1e-3,
                                    lr_schedule="cosine", batch_size=100, epochs=12,
                                    steps_per_epoch=600, steps_per_loop=100)
'''


def fashion_mnist(folder: str, seeds=(0,)) -> None:
    """Fashion-MNIST's IDX files as 8 TFRecord shards, and the CNN trained on
    them once per seed."""
    import tensorflow as tf

    from tftrain import data

    os.makedirs(folder, exist_ok=True)
    dataset = data.load("fashion_mnist")
    for split, part, shards in (("train", dataset.train, 8), ("test", dataset.test, 2)):
        for s in range(shards):
            path = os.path.join(folder, f"{split}-{s}-of-{shards}.tfrecord")
            with tf.io.TFRecordWriter(path) as writer:
                for i in range(s, len(part), shards):
                    feature = {
                        "image": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[part.images[i].tobytes()])
                        ),
                        "label": tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[int(part.labels[i])])
                        ),
                    }
                    example = tf.train.Example(features=tf.train.Features(feature=feature))
                    writer.write(example.SerializeToString())
    with open(os.path.join(folder, "exp.py"), "w") as f:
        f.write(FASHION_EXPERIMENT)
    accuracies = []
    for seed in seeds:
        model_dir = os.path.join(folder, f"run-seed{seed}")
        metrics, rss = run(
            [
                "train",
                f"--experiment={os.path.join(folder, 'exp.py')}",
                f"--data_dir={folder}",
                f"--model_dir={model_dir}",
                f"--seed={seed}",
                "--restart",
            ],
            model_dir,
        )
        accuracies.append(metrics["eval_accuracy"])
        print(
            f"fashion_mnist_cnn from TFRecord shards, seed {seed}: eval accuracy "
            f"{metrics['eval_accuracy']:.4f}, eval loss {metrics['eval_loss']:.4f}, "
            f"{metrics['examples_per_second']:,.0f} examples/s, peak memory {rss:,.0f} MiB",
            flush=True,
        )
    print(
        f"eval accuracy over {len(seeds)} seed(s): {min(accuracies):.4f}-{max(accuracies):.4f} "
        "(the IDX files over seeds 0-2: 0.9276-0.9318)"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=3.0)
    parser.add_argument("--folder", default="/tmp/tftrain_records")
    parser.add_argument("--pipeline_batches", type=int, default=2000)
    parser.add_argument(
        "--fashion_mnist",
        action="store_true",
        help="instead: Fashion-MNIST as TFRecord shards, the CNN trained on them (4 minutes)",
    )
    parser.add_argument("--seeds", default="0", help="with --fashion_mnist: seeds, e.g. 0,1,2")
    parser.add_argument(
        "--reading",
        action="store_true",
        help="instead: the records read alone, one per element or 256 per element",
    )
    args = parser.parse_args(argv)
    if args.reading:
        write_records(args.folder, args.gigabytes)
        for name, rate in reading_rates(args.folder).items():
            print(f"records read, {name}: {rate:,.0f}/s")
        return
    if args.fashion_mnist:
        seeds = [int(s) for s in args.seeds.split(",")]
        fashion_mnist(os.path.join(args.folder, "fashion_mnist"), seeds)
        return
    total = write_records(args.folder, args.gigabytes)
    with open(os.path.join(args.folder, "exp.py"), "w") as f:
        f.write(EXPERIMENT)
    size = sum(
        os.path.getsize(os.path.join(args.folder, n))
        for n in os.listdir(args.folder)
        if n.startswith("train-") and n.endswith(".tfrecord")
    )
    rate = pipeline_rate(args.folder, args.pipeline_batches)
    model_dir = os.path.join(args.folder, "run")
    steps = total // 256
    metrics, rss = run(
        [
            "train",
            f"--experiment={os.path.join(args.folder, 'exp.py')}",
            f"--data_dir={args.folder}",
            f"--model_dir={model_dir}",
            f"--train_steps={steps}",
            f"--steps_per_epoch={steps}",
            "--restart",
            "--noexport",
        ],
        model_dir,
    )
    trained = metrics["examples_per_second"]
    print(f"records: {total:,} examples, {size / 2**30:.2f} GiB in {SHARDS} files")
    print(f"input pipeline alone: {rate:,.0f} examples/s")
    print(f"training (one pass, {steps:,} steps): {trained:,.0f} examples/s")
    print(f"input / model: {rate / trained:.1f}x")
    print(f"peak resident memory of the training process: {rss:,.0f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Datasets: Fashion-MNIST IDX files, TFDS, synthetic; and the tf.data pipeline.

The training order is a pure function of ``(seed, step)``: epoch ``e`` visits
the examples in a permutation drawn from the stateless seed ``(seed, e)``,
cut into global batches. A resumed run therefore rebuilds exactly the batch
sequence it left, from the global step alone, and every strategy (one
device, mirrored, multi-worker) sees the same global batches.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import stat
import struct

import numpy as np

from tftrain.errors import DataError, first_line  # DataError re-exported: tftrain.data.DataError

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_DATASETS = ("fashion_mnist", "mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SYNTHETIC_SHAPE = (28, 28, 1)
SYNTHETIC_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in memory: uint8 images (N, H, W, C) and int32 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n])

    def shard(self, num_shards: int, index: int) -> Split:
        """Every ``num_shards``-th example from ``index`` (a view, no copy)."""
        if num_shards == 1:
            return self
        return Split(self.images[index::num_shards], self.labels[index::num_shards])


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    vocab_size: int | None = None  # token-id datasets: ids are 0 to vocab_size - 1

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One example's shape (an image's, or a token sequence's length)."""
        return tuple(self.train.images.shape[1:])

    @property
    def input_dtype(self) -> str:
        """What the model takes: float32 pixel values, or int32 token ids."""
        return "int32" if self.vocab_size else "float32"


# --------------------------------------------------------------------------
# Reading.


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (optionally gzipped) into a NumPy array.

    The format (LeCun et al.): two zero bytes, a type byte, a dimension
    count byte, then one big-endian uint32 per dimension, then the data.

    Raises:
      DataError: when the file is missing, truncated or not IDX.
    """
    _regular_file(path)
    try:
        raw = _read_bytes(path)
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header is incomplete.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes; its header "
            f"{tuple(shape)} promises {expected}."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _classes(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as class numbers; DataError for a label that is not a whole
    number (a cast would silently truncate 1.5 to class 1)."""
    if labels.dtype.kind == "f":
        bad = labels[~np.isfinite(labels) | (labels != np.floor(labels))]
        if bad.size:
            raise DataError(f"{where} holds the label {bad[0]!r}: expected whole class numbers.")
    return labels.astype(np.int32)


def _regular_file(path: str) -> None:
    """DataError for a local path that is not a regular file: reading a FIFO
    (or a terminal) would wait forever for a writer."""
    if "://" in path:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: said where it is opened
    if stat.S_ISDIR(mode):
        raise DataError(f"{path} is a folder: expected a data file.")
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{path} is not a regular file (a FIFO, a device or a socket): expected a "
            "data file; a FIFO would be read forever."
        )


def _read_bytes(path: str) -> bytes:
    """A local file's bytes, or a URL's through TensorFlow's filesystems."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.OpError as e:
        raise OSError(e.message.splitlines()[0]) from None


def _find(data_dir: str, stem: str) -> str | None:
    from tftrain import fileio

    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if fileio.exists(path):
            return path
    return None


# MNIST and Fashion-MNIST, the datasets stored as IDX files, have 10 classes.
IDX_CLASSES = 10


def load_idx(name: str, data_dir: str | None) -> Dataset:
    """Loads MNIST-format IDX files (train and t10k) from ``data_dir``."""
    data_dir = data_dir or DEFAULT_FASHION_MNIST_DIR
    splits = {}
    for split, stems in _IDX_FILES.items():
        paths = [_find(data_dir, stem) for stem in stems]
        if None in paths:
            missing = stems[paths.index(None)]
            raise DataError(
                f"--dataset={name}: no {missing}[.gz] in --data_dir={data_dir}. "
                "Install the embedded Fashion-MNIST with "
                "`sudo apt-get install dataset-fashion-mnist` (it fills "
                f"{DEFAULT_FASHION_MNIST_DIR}), point --data_dir at a folder of "
                "IDX files, or name a TFDS dataset that TFDS can load."
            )
        images, labels = (read_idx(p) for p in paths)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{data_dir}: {split} images {images.shape} and labels "
                f"{labels.shape} do not match (expected (N, H, W) and (N,))."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= IDX_CLASSES):
            bad = int(labels.max() if labels.max() >= IDX_CLASSES else labels.min())
            raise DataError(
                f"{paths[1]} holds the label {bad}: expected class numbers 0-"
                f"{IDX_CLASSES - 1} ({name} has {IDX_CLASSES} classes)."
            )
        splits[split] = Split(images[..., None].astype(np.uint8), _classes(labels, paths[1]))
    return Dataset(name, splits["train"], splits["test"], IDX_CLASSES)


# Where TFDS downloads most datasets from (MNIST's among them).
DOWNLOAD_HOST = "storage.googleapis.com"


def can_reach_downloads(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to DOWNLOAD_HOST opens within ``timeout``
    seconds (a name lookup that hangs counts as no)."""
    import socket
    import threading

    reached = []

    def connect():
        try:
            socket.create_connection((DOWNLOAD_HOST, 443), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(reached)


def load_tfds(name: str, data_dir: str | None) -> Dataset:
    """Loads an image classification dataset from TFDS into memory."""
    import tensorflow_datasets as tfds  # heavy: imported only when used
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # its notes on empty folders
    try:
        prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # noqa: BLE001 - an unknown name: tfds.load below says so
        prepared = True
    finally:
        absl_logging.set_verbosity(level)
    if not prepared and not can_reach_downloads():
        # TFDS would retry its download for minutes before failing.
        raise DataError(
            f"--dataset={name} is not prepared in "
            f"{data_dir or 'TFDS data folder (~/tensorflow_datasets)'} and this machine cannot "
            f"reach {DOWNLOAD_HOST} to download it. Prepare it where there is a network "
            "(tfds build, or one tftrain run there) and point --data_dir at that folder, or "
            "use --dataset=fashion_mnist for the embedded IDX files."
        )
    try:
        loaded, info = tfds.load(
            name, split=["train", "test"], data_dir=data_dir, as_supervised=True, with_info=True
        )
    except Exception as e:  # TFDS raises many types; all mean "not loadable"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"--dataset={name}: TFDS could not load its train and test splits "
            f"({first_line}). Use a TFDS name that is downloaded in --data_dir (or can "
            "be downloaded), or --dataset=fashion_mnist for the embedded IDX "
            "files."
        ) from None
    splits = {}
    for split, ds in zip(("train", "test"), loaded):
        chunks = list(ds.batch(8192).as_numpy_iterator())
        if not chunks:
            raise DataError(f"--dataset={name}: its {split} split is empty.")
        images = np.concatenate([c[0] for c in chunks])
        labels = np.concatenate([c[1] for c in chunks])
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(
                f"--dataset={name}: expected uint8 images, got "
                f"{images.dtype} of shape {images.shape}."
            )
        splits[split] = Split(images, _classes(labels, f"--dataset={name}'s {split} split"))
    label_feature = info.features["label"]
    return Dataset(name, splits["train"], splits["test"], int(label_feature.num_classes))


def make_synthetic(seed: int, num_train: int = 6000, num_test: int = 1000) -> Dataset:
    """A learnable synthetic dataset: labels from a fixed random linear teacher.

    Deterministic in ``seed``. Used by benchmarks (no I/O) and tests.
    """
    rng = np.random.default_rng(seed)
    dim = int(np.prod(SYNTHETIC_SHAPE))
    teacher = rng.normal(size=(dim, SYNTHETIC_CLASSES)).astype(np.float32)

    def split(n):
        images = rng.integers(0, 256, size=(n, *SYNTHETIC_SHAPE), dtype=np.uint8)
        centred = images.reshape(n, dim).astype(np.float32) / 255.0 - 0.5
        return Split(images, np.argmax(centred @ teacher, axis=1).astype(np.int32))

    return Dataset("synthetic", split(num_train), split(num_test), SYNTHETIC_CLASSES)


def make_synthetic_tokens(
    seed: int,
    num_train: int = 6000,
    num_test: int = 1000,
    vocab_size: int = 1000,
    length: int = 16,
    num_classes: int = 4,
) -> Dataset:
    """Sequences of token ids whose class is the most frequent class of their
    tokens (each token id belongs to one class): learnable by an embedding
    bag. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    token_class = rng.integers(0, num_classes, size=vocab_size)

    def split(n):
        ids = rng.integers(0, vocab_size, size=(n, length), dtype=np.int32)
        votes = np.stack([(token_class[ids] == c).sum(axis=1) for c in range(num_classes)], 1)
        return Split(ids, np.argmax(votes, axis=1).astype(np.int32))

    return Dataset("synthetic_tokens", split(num_train), split(num_test), num_classes, vocab_size)


def load(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """Loads a dataset by name: IDX files first for the MNIST family, else TFDS."""
    if name == "synthetic":
        return make_synthetic(seed)
    if name == "synthetic_tokens":
        return make_synthetic_tokens(seed)
    if name == "fashion_mnist" or (
        name == "mnist" and data_dir and _find(data_dir, _IDX_FILES["train"][0])
    ):
        return load_idx(name, data_dir)
    return load_tfds(name, data_dir)


# --------------------------------------------------------------------------
# The tf.data pipeline.


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Whole global batches in one epoch (the remainder is dropped).

    Raises:
      DataError: when not even one batch fits in the examples.
    """
    if global_batch_size > num_examples:
        raise DataError(
            f"--batch_size={global_batch_size} is larger than the {num_examples} "
            f"training examples: expected at most {num_examples}."
        )
    return num_examples // global_batch_size


def epoch_permutation(num_examples: int, seed: int, epoch):
    """The order of epoch ``epoch``: a stateless permutation of the examples."""
    import tensorflow as tf

    keys = tf.random.stateless_uniform(
        [num_examples],
        seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]),
        dtype=tf.float32,
    )
    return tf.argsort(keys, stable=True)


def train_dataset(
    split: Split,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
    replicas: int = 1,
):
    """Global batches of ``(images, int32 labels)``, forever.

    Batch ``k`` of the stream is training step ``start_step + k`` of the run;
    the stream depends only on the data, the batch size, the seed and
    ``start_step``. Images come as stored: uint8 pixels (the model converts
    them and rescales: a quarter of float32's bytes through the pipeline and
    onto the device), or int32 token ids.

    With ``num_shards > 1`` the stream holds only slice ``shard_index`` of
    every global batch (``global_batch_size / num_shards`` examples): what
    one of ``num_shards`` workers trains on. The shards of a step together
    are exactly the unsharded global batch, and a worker gathers only its
    own examples. With ``replicas > 1`` each shard comes as that many
    consecutive batches, one per replica of the input pipeline.
    """
    import tensorflow as tf

    n = len(split)
    per_epoch = steps_per_epoch(n, global_batch_size)
    images = tf.constant(split.images)
    labels = tf.constant(split.labels)
    first_epoch, first_batch = divmod(start_step, per_epoch)

    if global_batch_size % num_shards or not 0 <= shard_index < num_shards:
        raise DataError(
            f"--batch_size={global_batch_size} does not split into {num_shards} equal "
            f"shards: expected a multiple of {num_shards}."
        )
    shard = global_batch_size // num_shards
    if shard % replicas:
        raise DataError(
            f"--batch_size={global_batch_size} does not split into {num_shards * replicas} "
            f"equal replica batches: expected a multiple of {num_shards * replicas}."
        )
    per_replica = shard // replicas

    group = _batches_per_gather(split, per_replica)

    def epoch_batches(epoch):
        order = epoch_permutation(n, seed, epoch)[: per_epoch * global_batch_size]
        rows = tf.reshape(order, [per_epoch, global_batch_size])
        rows = rows[:, shard_index * shard : (shard_index + 1) * shard]
        if replicas > 1:
            rows = tf.reshape(rows, [-1, per_replica])
        # Only the first epoch of a resumed run starts part-way through.
        rows = rows[tf.where(epoch == first_epoch, first_batch * replicas, 0) :]
        # Gathered ``group`` batches at a time (one gather instead of many
        # small ones), then handed out a batch at a time; the epoch's last
        # batches, fewer than a group, one at a time.
        whole = tf.shape(rows)[0] // group * group
        grouped = tf.reshape(rows[:whole], [-1, group, per_replica])
        rest = tf.reshape(rows[whole:], [-1, 1, per_replica])
        return tf.data.Dataset.from_tensor_slices(grouped).concatenate(
            tf.data.Dataset.from_tensor_slices(rest)
        )

    ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch_batches)
    ds = ds.map(
        lambda idx: (_stored(tf.gather(images, idx)), tf.gather(labels, idx)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)))
    # The stream never ends, and saying so matters: for a stream of unknown
    # length a multi-worker strategy all-reduces "does every worker still have
    # data?" before every step, a collective per step.
    ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def eval_dataset(split: Split, *, batch_size: int):
    """The whole split once, in order, in batches (the last may be short)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    ds = ds.batch(batch_size).map(lambda x, y: (_stored(x), y))
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def _stored(x):
    """Pixels stay uint8 (the model takes them as they are); any other
    integer ids become int32."""
    import tensorflow as tf

    return x if x.dtype == tf.uint8 else tf.cast(x, tf.int32)


# Bytes gathered at once by the training stream, at most (and at most this
# many batches): enough to amortise the per-element cost of tf.data.
_GATHER_BYTES = 4 << 20
_GATHER_BATCHES = 20


def _batches_per_gather(split: Split, shard: int) -> int:
    example_bytes = split.images[:1].nbytes or 1
    return max(1, min(_GATHER_BATCHES, _GATHER_BYTES // (shard * example_bytes)))


def _with_options(ds):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    # Shard by element: each worker keeps its slice of every global batch,
    # so N workers together still take one global batch per step.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


# --------------------------------------------------------------------------
# Helpers for a Task's build_inputs: files and arrays, streamed.
#
# Each helper returns batches as build_inputs must: per replica, sharded over
# the input pipelines, shuffled from the run's seed (training), with decoding
# in parallel and prefetching. ``shard`` says how the pipelines share the data:
#
# - "example": every pipeline reads the same shuffled stream and keeps every
#   N-th example, so the pipelines' batches of one step are together exactly
#   the global batch one device would take (the form for equivalent runs);
# - "file": each pipeline reads its own files (no example is read twice);
# - "auto": "file" when there are at least as many files as pipelines.

SHARD_CHOICES = ("auto", "example", "file")


def _per_replica(config, context, training: bool) -> int:
    if training:
        try:
            return context.get_per_replica_batch_size(config.batch_size)
        except ValueError:
            raise DataError(
                f"--batch_size={config.batch_size} does not split over "
                f"{context.num_replicas_in_sync} replicas: expected a multiple of "
                f"{context.num_replicas_in_sync}."
            ) from None
    return max(1, config.eval_batch_size // context.num_replicas_in_sync)


def _check_shard(shard: str) -> None:
    if shard not in SHARD_CHOICES:
        raise DataError(f"shard={shard!r}: expected one of {', '.join(SHARD_CHOICES)}.")


def batches(
    examples,
    *,
    config,
    context,
    training: bool,
    shard: str = "example",
    shuffle_buffer: int = 10_000,
    map_batch=None,
    augment=None,
    cache: bool = False,
    _chunked: bool = False,
):
    """Batches of a ``tf.data.Dataset`` of single examples, as build_inputs
    returns them.

    In training the stream is endless: epoch ``e`` visits the examples in an
    order drawn from ``(seed, e)`` alone (consecutive windows of
    ``shuffle_buffer`` examples, each permuted statelessly), so the stream is
    a function of the step: a resumed run builds it at ``context.start_step``
    and every worker is where the uninterrupted run would be, with no input
    state in the checkpoint. (TensorFlow's reshuffling ``shuffle`` keeps a
    seed generator across epochs that a restored iterator was measured not to
    follow; and a worker's buffered batches are its own.)

    Args:
      examples: one element per example (any structure).
      shard: "example" (see above), or "none" when the pipelines already hold
        their own examples (their files).
      shuffle_buffer: examples shuffled together in training (0: in order).
      map_batch: a function applied to each batch (decoding), in parallel.
      augment: in training, a function of one example and a seed,
        ``augment(*example, seed)`` (``augment(image, label, seed)`` for
        ``(image, label)`` pairs), returning the example: draw its randomness
        from ``seed`` with TensorFlow's stateless ops
        (``tf.image.stateless_random_crop``, ...). The seed of an example is
        a function of the run's seed, the epoch and the example's place in
        the pass alone, so every replica count, worker count and resume
        gives each example the same augmentation.
      cache: keep the examples in memory after the first pass.
    """
    import tensorflow as tf

    limit = config.max_train_examples if training else config.max_eval_examples
    # ``_chunked``: the elements are chunks of consecutive examples (batched
    # per file as they are read, which spares tf.data a step per record);
    # the shuffle cuts its windows from them whole, anything else takes the
    # examples one at a time.
    if _chunked and (limit or not (training and shuffle_buffer)):
        examples, _chunked = examples.unbatch(), False
    if limit:
        examples = examples.take(limit)
    if cache:
        examples = examples.cache()
    per_replica = _per_replica(config, context, training)
    pipelines, index = context.num_input_pipelines, context.input_pipeline_id

    augment = augment if training else None
    # Examples of a pipeline's own files are told apart from other pipelines'.
    stream = 0 if shard == "example" else index

    def one_pass(epoch, mapped=True):
        if training and shuffle_buffer:
            # The same order on every pipeline: one shuffled stream, then sharded.
            ds = _shuffled_batches(
                examples,
                shuffle_buffer,
                config.batch_size,
                config.seed,
                epoch,
                pipelines if shard == "example" else 1,
                index if shard == "example" else 0,
                per_replica,
                chunked=_chunked,
                keyed=augment is not None,
            )
        else:
            ex = examples
            if augment is not None:  # each example with its place in the pass
                ex = ex.enumerate().map(lambda i, e: {"rows": e, "at": i})
            if shard == "example" and pipelines > 1:
                ex = ex.shard(pipelines, index)
            ds = ex.batch(per_replica, drop_remainder=training)
        if augment is not None:
            ds = ds.map(
                lambda b: {
                    "rows": b["rows"],
                    "keys": _example_keys(config.seed, stream, epoch, b["at"]),
                }
            )
        if mapped:
            ds = _mapped(ds, map_batch, augment)
        return ds

    if not training:
        return _plain_options(one_pass(tf.constant(0, tf.int64)).prefetch(tf.data.AUTOTUNE))
    raw = one_pass(tf.constant(0, tf.int64), mapped=False)
    # (Inside a traced function, as a coordinator builds each worker's
    # stream, the checks were made when the same data were read eagerly.)
    eager = tf.executing_eagerly()
    batches_per_pass = int(raw.cardinality()) if eager else -1
    known = int(examples.cardinality()) if eager and not _chunked else -1
    if batches_per_pass < 0 and known >= 0 and shuffle_buffer:  # windows of a known count
        window = -(-shuffle_buffer // config.batch_size) * config.batch_size
        p, i = (pipelines, index) if shard == "example" else (1, 0)
        full, rest = divmod(known, window)
        batches_per_pass = (
            full * (window // p // per_replica) + len(range(i, rest, p)) // per_replica
        )
    if eager and (
        batches_per_pass == 0 or (batches_per_pass < 0 and not any(True for _ in raw.take(1)))
    ):
        # An endless stream of empty passes would never yield a batch.
        raise DataError(
            f"the training data give no batch of {per_replica} example(s) "
            f"(input pipeline {index} of {pipelines}): they are empty or too few."
        )
    # Each step takes one batch per replica of the pipeline.
    local = max(1, context.num_replicas_in_sync // pipelines)
    start = getattr(context, "start_step", 0) * local  # batches this pipeline has taken
    if start:
        # The stream is a function of (seed, epoch): a resumed run starts it
        # where the uninterrupted run is, reading (not decoding) the batches
        # of the current epoch before that point.
        if batches_per_pass > 0:
            per_pass = tf.constant(batches_per_pass, tf.int64)
        else:  # files of unknown length: counted, reading the records once
            per_pass = raw.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)
        epoch, offset = start // per_pass, start % per_pass
        ds = tf.data.Dataset.counter(epoch).flat_map(lambda e: one_pass(e, mapped=False))
        ds = ds.skip(offset)
    else:
        ds = tf.data.Dataset.counter().flat_map(lambda e: one_pass(e, mapped=False))
    ds = _plain_options(_mapped(ds, map_batch, augment).prefetch(tf.data.AUTOTUNE))
    # Read by tftrain: the length of an epoch (an endless stream has none),
    # and that the stream is positioned by context.start_step.
    ds.tftrain_steps_per_epoch = batches_per_pass // local if batches_per_pass > 0 else None
    ds.tftrain_positioned = True
    return ds


def _example_keys(seed: int, stream: int, epoch, at):
    """Stateless seeds, shape ``at.shape + [2]``, of the examples at places
    ``at`` of a pass: apart from every key of the shuffle's permutations
    (those start with the run's seed itself)."""
    import tensorflow as tf

    first = tf.fill(tf.shape(at), tf.constant(seed * 7919 + stream + 0x61756700, tf.int64))
    return tf.stack([first, tf.cast(epoch, tf.int64) * (1 << 36) + at], axis=-1)


def _mapped(ds, map_batch, augment):
    """The batches decoded by ``map_batch`` and augmented, in parallel."""
    import tensorflow as tf

    if augment is None:
        if map_batch is None:
            return ds
        return ds.map(map_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def call(example, key):
        return augment(*example, key) if isinstance(example, tuple) else augment(example, key)

    rows = ds.element_spec["rows"]
    decoded = rows if map_batch is None else ds.map(lambda e: map_batch(e["rows"])).element_spec
    one = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), decoded)
    signature = _augmented_signature(augment, call, one)

    def apply(element):
        batch = element["rows"] if map_batch is None else map_batch(element["rows"])
        return tf.map_fn(
            lambda a: call(*a), (batch, element["keys"]), fn_output_signature=signature
        )

    return ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# Ops that draw from a generator's state: an augmentation built on them
# would draw differently on each run, replica and resume.
_STATEFUL_RANDOM_OPS = {
    "RandomUniform",
    "RandomUniformInt",
    "RandomStandardNormal",
    "TruncatedNormal",
    "RandomShuffle",
    "RandomGamma",
    "RandomPoissonV2",
    "Multinomial",
    "StatefulUniform",
    "StatefulUniformInt",
    "StatefulUniformFullInt",
    "StatefulStandardNormalV2",
    "StatefulTruncatedNormal",
    "RngReadAndSkip",
}


def _augmented_signature(augment, call, one):
    """What ``augment`` makes of one example (``one``: its spec), traced once
    apart: it must give back an example of the same structure, dtypes and
    shapes (evaluation data are not augmented, so the model would see other
    inputs there), and draw its randomness from the seed alone."""
    import tensorflow as tf

    from tftrain import tasks

    name = getattr(augment, "__name__", "augment")
    traced = tasks.call_user(
        f"augment={name}",
        lambda: tf.function(call).get_concrete_function(one, tf.TensorSpec([2], tf.int64)),
    )
    stateful = sorted(
        {op.type for op in traced.graph.get_operations() if op.type in _STATEFUL_RANDOM_OPS}
    )
    if stateful:
        raise DataError(
            f"augment={name} draws with {', '.join(stateful)}, which keeps its own state: "
            "every run, replica and resume would draw differently. Draw from the seed it "
            "is given with stateless ops (tf.random.stateless_uniform, "
            "tf.image.stateless_random_flip_left_right, ...)."
        )
    out = traced.structured_outputs
    given = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), out)

    def describe(spec):
        return ", ".join(f"{t.dtype.name}{list(t.shape)}" for t in tf.nest.flatten(spec))

    same = False
    try:
        tf.nest.assert_same_structure(tuple(out) if isinstance(out, list) else out, one)
        same = all(
            a.dtype == b.dtype and a.shape.is_compatible_with(b.shape)
            for a, b in zip(tf.nest.flatten(given), tf.nest.flatten(one))
        )
    except (TypeError, ValueError):
        pass
    if not same:
        raise DataError(
            f"augment={name} turns an example of ({describe(one)}) into ({describe(given)}): "
            "it must give the example back with the same parts, dtypes and shapes "
            "(evaluation data are not augmented; convert and resize in the model or in "
            "the decoding instead)."
        )
    return one


def translate_and_flip(max_shift: int = 4, flip: bool = True):
    """An ``augment=`` for images: a random translation of up to
    ``max_shift`` pixels each way (a crop of the image zero-padded by
    ``max_shift``) and, with ``flip``, a random horizontal flip, both drawn
    from the example's seed. The first element of an example is its image
    (height, width, channels); the rest pass through."""
    import tensorflow as tf

    def augment(image, *rest):
        *rest, seed = rest
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if max_shift:
            pad = [[max_shift, max_shift], [max_shift, max_shift], [0, 0]]
            image = tf.image.stateless_random_crop(tf.pad(image, pad), tf.shape(image), crop_seed)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return (image, *rest)

    return augment


def _shuffled_batches(
    examples,
    buffer: int,
    global_batch: int,
    seed: int,
    epoch,
    pipelines,
    index,
    batch: int,
    chunked: bool = False,
    keyed: bool = False,
):
    """Batches of ``batch`` examples of one pass, shuffled: consecutive
    windows of about ``buffer`` examples (a multiple of the global batch, so
    that every pipeline and replica count cuts the same windows), each
    permuted by a stateless permutation of ``(seed, epoch, window)``, then
    shard ``index`` of ``pipelines`` of each window (every ``pipelines``-th
    example, as a shard of the whole stream), cut into batches. A window is
    cut into batches as a whole (no example at a time through tf.data), and
    several windows are cut at once (a parallel map: the permutation and the
    copy are most of the stream's work after reading); the rest of the last
    window, less than a batch, is dropped, as ``drop_remainder`` would."""
    import tensorflow as tf

    window = -(-buffer // global_batch) * global_batch

    def permuted(i, block):
        n = tf.shape(tf.nest.flatten(block)[0])[0]
        key = tf.stack([tf.constant(seed, tf.int64), epoch * 1_000_003 + i])
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=key)
        order = order[index::pipelines]
        order = order[: tf.size(order) // batch * batch]
        rows = tf.reshape(order, [-1, batch])
        cut = tf.nest.map_structure(lambda t: tf.gather(t, rows), block)
        if keyed:  # and each example's place in the pass
            return {"rows": cut, "at": tf.cast(rows, tf.int64) + i * window}
        return cut

    # (In a dict, so that tf.data hands the map and the flat_map each window
    # as one structure, whatever the examples' own structure is.)
    def named(i, block):
        return {"i": i, "block": block}

    def cut_window(window):
        return {"rows": permuted(window["i"], window["block"])}

    def rows_of(cut):
        return tf.data.Dataset.from_tensor_slices(cut["rows"])

    # (Chunks are joined into windows without taking the examples apart.)
    joined = examples.rebatch(window) if chunked else examples.batch(window)
    windows = joined.enumerate().map(named)
    # Two windows at once: each is held whole, and its cut copy beside it.
    cut = windows.map(cut_window, num_parallel_calls=2, deterministic=True)
    return cut.flat_map(rows_of)


def _plain_options(ds):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    # The helpers shard themselves; TensorFlow must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def from_arrays(features, labels, sample_weights=None, *, config, context, training, **kwargs):
    """Batches of NumPy arrays (or nested dicts/tuples of them) held in memory.

    Training visits a new permutation of all the examples each epoch, drawn
    from ``(seed, epoch)``; the permutation is of indices, so the arrays are
    not copied into a shuffle buffer. Other arguments: as :func:`batches`.
    """
    import tensorflow as tf

    arrays = (features, labels) if sample_weights is None else (features, labels, sample_weights)
    sizes = {len(a) for a in tf.nest.flatten(arrays)}
    if len(sizes) != 1:
        raise DataError(
            f"from_arrays: features, labels and weights hold different numbers of examples "
            f"({', '.join(map(str, sorted(sizes)))})."
        )
    n = sizes.pop()
    if n == 0:
        raise DataError("from_arrays: the arrays hold no examples.")
    tensors = tf.nest.map_structure(tf.constant, arrays)
    limit = config.max_train_examples if training else config.max_eval_examples
    n = min(n, limit) if limit else n
    indices = tf.data.Dataset.range(n)
    shuffle = kwargs.pop("shuffle_buffer", n)
    kwargs.pop("map_batch", None)
    config = config.replace(max_train_examples=None, max_eval_examples=None)
    return batches(
        indices,
        config=config,
        context=context,
        training=training,
        shuffle_buffer=n if shuffle else 0,  # a permutation of the indices: no copies
        map_batch=lambda idx: tf.nest.map_structure(lambda t: tf.gather(t, idx), tensors),
        **kwargs,
    )


def _files(patterns, what: str) -> list[str]:
    import tensorflow as tf

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for pattern in patterns:
        try:
            found = tf.io.gfile.glob(pattern)
        except tf.errors.OpError as e:
            raise DataError(
                f"{what}: cannot list {pattern} ({e.message.splitlines()[0]})."
            ) from None
        if not found:
            raise DataError(f"{what}: no file matches {pattern}.")
        for path in found:
            _regular_file(path)
        files.extend(sorted(found))
    return files


def _file_shards(files, context, shard: str):
    """The files this pipeline reads, and whether it still has to shard by example."""
    import tensorflow as tf

    _check_shard(shard)
    n = context.num_input_pipelines
    by_file = shard == "file" or (shard == "auto" and len(files) >= n)
    if by_file and n > 1:
        if len(files) < n:
            raise DataError(
                f"shard='file' needs at least one file per input pipeline: {len(files)} "
                f"file(s) for {n} pipelines (use shard='example')."
            )
        files = files[context.input_pipeline_id :: n]
    # The files keep their order: the examples are shuffled after they are
    # read. (A second reshuffling dataset, of the file names, under the
    # examples' shuffle was measured here not to resume exactly from an
    # iterator checkpoint once the run crosses an epoch boundary.)
    return tf.data.Dataset.from_tensor_slices(files), ("none" if by_file else "example")


def tfrecords(
    patterns,
    features: dict,
    *,
    config,
    context,
    training: bool,
    label: str = "label",
    weight: str | None = None,
    decode=None,
    shard: str = "auto",
    compression: str | None = None,
    shuffle_buffer: int = 10_000,
    augment=None,
    cache: bool = False,
):
    """Batches of ``tf.train.Example`` records from TFRecord files.

    Args:
      patterns: a file pattern or a list of them (any filesystem TensorFlow
        opens).
      features: the feature spec, as ``tf.io.parse_example`` takes it.
      label: the feature that holds the labels; ``weight``: the one holding
        sample weights, if any. The other features are the model's inputs: a
        dict, or the tensor itself when there is one.
      decode: instead, a function of the parsed batch (a dict) returning
        ``(features, labels)`` or ``(features, labels, weights)``.
      shard, shuffle_buffer, cache, augment: as :func:`batches`; records are read from
        several files at once and parsed a batch at a time, in parallel.
    """
    import tensorflow as tf

    files = _files(patterns, "tfrecords")
    names, shard_by = _file_shards(files, context, shard)
    if decode is None and label not in features:
        raise DataError(
            f"tfrecords: the feature spec has no {label!r} feature for the labels "
            f"(it has {', '.join(features)}): name it with label=... or pass decode=."
        )
    # Dense features are parsed as the records are read, before the shuffle,
    # a chunk of each file at a time: the windows then hold tensors rather
    # than one string per record (BUILD_NOTES.md, "Streaming a large
    # TFRecord dataset"). Sparse and ragged ones are parsed after it, a batch
    # at a time.
    dense = all(isinstance(f, tf.io.FixedLenFeature) for f in features.values())

    def read(f):
        records = tf.data.TFRecordDataset(f, compression_type=compression, buffer_size=1 << 20)
        return records.batch(_CHUNK)

    chunks = names.interleave(
        read,
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if dense:
        chunks = chunks.map(
            lambda serialized: tf.io.parse_example(serialized, features),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def parse(batch):
        parsed = batch if dense else tf.io.parse_example(batch, features)
        if decode is not None:
            return decode(parsed)
        inputs = {k: v for k, v in parsed.items() if k not in (label, weight)}
        x = next(iter(inputs.values())) if len(inputs) == 1 else inputs
        return (x, parsed[label]) if weight is None else (x, parsed[label], parsed[weight])

    return batches(
        chunks,
        config=config,
        context=context,
        training=training,
        shard=shard_by,
        shuffle_buffer=shuffle_buffer,
        map_batch=parse,
        cache=cache,
        augment=augment,
        _chunked=True,
    )


# Records read from one file at a time, as one element.
_CHUNK = 256


def csv(
    patterns,
    *,
    config,
    context,
    training: bool,
    label: str,
    columns: list[str] | None = None,
    defaults: list | None = None,
    as_dict: bool = False,
    shard: str = "auto",
    shuffle_buffer: int = 10_000,
    augment=None,
    cache: bool = False,
):
    """Batches of rows of CSV files with a header line.

    Args:
      label: the column of the labels.
      columns: the feature columns (default: every other column).
      defaults: each column's default, which sets its dtype (``tf.io.decode_csv``'s
        ``record_defaults``); default: float32 for every column.
      as_dict: features as a dict of columns instead of one float32 matrix.
    """
    import tensorflow as tf

    files = _files(patterns, "csv")
    with tf.io.gfile.GFile(files[0]) as f:
        header = f.readline().strip().split(",")
    if label not in header:
        raise DataError(f"csv: {files[0]} has no column {label!r} (it has {', '.join(header)}).")
    columns = columns or [c for c in header if c != label]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"csv: {files[0]} has no column {missing[0]!r}.")
    defaults = defaults or [0.0] * len(header)
    if len(defaults) != len(header):
        raise DataError(f"csv: {len(defaults)} defaults for {len(header)} columns.")
    names, shard_by = _file_shards(files, context, shard)
    lines = names.interleave(
        lambda f: tf.data.TextLineDataset(f).skip(1),
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )

    def parse(line_batch):
        values = dict(zip(header, tf.io.decode_csv(line_batch, record_defaults=defaults)))
        if as_dict:
            x = {c: values[c] for c in columns}
        else:
            x = tf.stack([tf.cast(values[c], tf.float32) for c in columns], axis=1)
        return x, values[label]

    return batches(
        lines,
        config=config,
        context=context,
        training=training,
        shard=shard_by,
        shuffle_buffer=shuffle_buffer,
        map_batch=parse,
        cache=cache,
        augment=augment,
    )


def tfds(
    name: str,
    split: str,
    *,
    config,
    context,
    training: bool,
    data_dir: str | None = None,
    decode=None,
    shard: str = "auto",
    shuffle_buffer: int = 10_000,
    augment=None,
    cache: bool = False,
):
    """Batches of a TFDS dataset already prepared in ``data_dir`` (never
    downloaded, never loaded whole), as ``(features, label)`` pairs
    (``as_supervised``); ``decode`` maps each batch."""
    import tensorflow_datasets as tfds_lib

    data_dir = data_dir or config.data_dir
    try:
        builder = tfds_lib.builder(name, data_dir=data_dir)
        info = builder.info
        ready = builder.is_prepared()
    except Exception as e:  # noqa: BLE001 - TFDS raises many types for an unknown name
        first = first_line(e)
        raise DataError(f"tfds: no dataset {name!r} ({first[:200]}).") from None
    if not ready:
        raise DataError(
            f"tfds: {name} is not prepared in data_dir={data_dir or '~/tensorflow_datasets'}: "
            "prepare it there first (tfds build, or download_and_prepare on a machine "
            "with a network); tftrain never downloads."
        )
    if split not in info.splits:
        raise DataError(f"tfds: {name} has no split {split!r} (it has {', '.join(info.splits)}).")
    _check_shard(shard)
    num_files = info.splits[split].num_shards
    n = context.num_input_pipelines
    by_file = n > 1 and (shard == "file" or (shard == "auto" and num_files >= n))
    read_config = tfds_lib.ReadConfig(
        input_context=context if by_file else None,
        shuffle_seed=config.seed,
        interleave_cycle_length=min(num_files, 8),
    )
    examples = builder.as_dataset(
        split=split,
        as_supervised=True,
        shuffle_files=training and num_files > 1,
        read_config=read_config,
    )
    return batches(
        examples,
        config=config,
        context=context,
        training=training,
        shard="none" if by_file else "example",
        shuffle_buffer=shuffle_buffer,
        map_batch=decode,
        cache=cache,
        augment=augment,
    )

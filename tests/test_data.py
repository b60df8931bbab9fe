import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf

from tftrain import data


def write_idx(path, array, gz=False):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_idx_dir(tmp_path, n_train=50, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            gz,
        )
        write_idx(
            tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}",
            rng.integers(0, 10, (n,), dtype=np.uint8),
            gz,
        )
    return str(tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
    write_idx(path, array, gz)
    np.testing.assert_array_equal(data.read_idx(path), array)


def test_read_idx_big_endian_ints(tmp_path):
    array = np.array([1, -2, 70000], dtype=">i4")
    write_idx(str(tmp_path / "i"), array)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "i")), [1, -2, 70000])


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(data.DataError, match="holds 3 data bytes"):
        data.read_idx(str(short))


def test_load_idx_from_folder(tmp_path):
    ds = data.load_idx("fashion_mnist", fake_idx_dir(tmp_path, gz=False))
    assert ds.train.images.shape == (50, 28, 28, 1) and ds.train.images.dtype == np.uint8
    assert ds.test.labels.shape == (20,) and ds.num_classes == 10


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load("fashion_mnist", str(tmp_path))
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_real_fashion_mnist(fashion_mnist_dir):
    ds = data.load("fashion_mnist", fashion_mnist_dir)
    assert ds.train.images.shape == (60000, 28, 28, 1)
    assert ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10
    # Balanced classes: 6,000 per class in train, 1,000 in test.
    assert set(np.bincount(ds.train.labels)) == {6000}
    assert set(np.bincount(ds.test.labels)) == {1000}


def test_tfds_path_with_mock_data(monkeypatch):
    import tensorflow_datasets as tfds

    # The mock stands in for a download that works: a machine online.
    monkeypatch.setattr(data, "can_reach_downloads", lambda timeout=5.0: True)
    with tfds.testing.mock_data(num_examples=30):
        ds = data.load("mnist", None)
    assert ds.train.images.shape[1:] == (28, 28, 1) and len(ds.train) == 30
    assert ds.num_classes == 10 and ds.train.images.dtype == np.uint8


def test_tfds_can_reach_its_download_code():
    # mock_data skips downloading; the download path first asks where the
    # builder's code lives, which imports importlib_resources (a package TFDS
    # uses without declaring it: tftrain declares it).
    import tensorflow_datasets as tfds

    assert tfds.builder_cls("mnist").code_path.name == "mnist.py"


def test_unknown_tfds_name_is_one_clear_error():
    with pytest.raises(data.DataError, match="--dataset=no_such_dataset_xyz: TFDS could not"):
        data.load("no_such_dataset_xyz", None)


def test_synthetic_is_deterministic_and_learnable():
    a, b = data.make_synthetic(3), data.make_synthetic(3)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    assert len(set(a.train.labels.tolist())) > 5  # not a constant label


def batches(split, n, **kw):
    ds = data.train_dataset(split, **kw)
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def test_train_order_depends_on_seed_only_and_covers_each_epoch():
    split = data.make_synthetic(0, num_train=100).train
    a = batches(split, 10, global_batch_size=10, seed=1)
    b = batches(split, 10, global_batch_size=10, seed=1)
    c = batches(split, 10, global_batch_size=10, seed=2)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    # One epoch is a permutation: every example exactly once.
    seen = np.concatenate([x for x, _ in a]).reshape(100, -1)
    assert len({row.tobytes() for row in seen}) == len(
        {row.tobytes() for row in split.images.reshape(100, -1)}
    )


def test_resumed_stream_continues_the_same_batches():
    split = data.make_synthetic(0, num_train=100).train
    full = batches(split, 25, global_batch_size=10, seed=5)  # 2.5 epochs
    for start in (3, 10, 17):
        resumed = batches(split, 25 - start, global_batch_size=10, seed=5, start_step=start)
        for (x1, y1), (x2, y2) in zip(full[start:], resumed):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)


def test_mirrored_replicas_split_each_global_batch():
    split = data.make_synthetic(0, num_train=80).train
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    ds = data.train_dataset(split, global_batch_size=8, seed=0)
    expected = next(iter(ds))[0].numpy()
    per_replica = next(iter(strategy.experimental_distribute_dataset(ds)))[0]
    parts = [t.numpy() for t in strategy.experimental_local_results(per_replica)]
    assert [len(p) for p in parts] == [4, 4]
    np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_eval_dataset_covers_the_split_once_in_order():
    split = data.make_synthetic(0, num_test=25).test
    got = np.concatenate([y.numpy() for _, y in data.eval_dataset(split, batch_size=10)])
    np.testing.assert_array_equal(got, split.labels)


def test_batch_larger_than_data_is_refused():
    split = data.make_synthetic(0, num_train=10).train
    with pytest.raises(data.DataError, match="--batch_size=20 is larger than the 10"):
        data.train_dataset(split, global_batch_size=20, seed=0)


def test_debian_data_dir_constant_matches_package_layout():
    assert os.path.basename(data.DEFAULT_FASHION_MNIST_DIR) == "fashion-mnist"


def assert_two_shards_are_the_halves(split, steps, *, seed, start_step):
    """Worker 0's and worker 1's batches, joined, are each global batch of 10."""
    kwargs = dict(global_batch_size=10, seed=seed, start_step=start_step)
    whole = batches(split, steps, **kwargs)
    halves = [batches(split, steps, **kwargs, num_shards=2, shard_index=i) for i in range(2)]
    for step, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([h[step][0] for h in halves]), x)
        np.testing.assert_array_equal(np.concatenate([h[step][1] for h in halves]), y)


def test_worker_shards_together_are_the_global_batch():
    split = data.make_synthetic(0, num_train=100).train
    assert_two_shards_are_the_halves(split, 12, seed=3, start_step=4)


def test_a_global_batch_that_does_not_split_into_shards_is_refused():
    split = data.make_synthetic(0, num_train=100).train
    with pytest.raises(data.DataError, match="multiple of 3"):
        data.train_dataset(split, global_batch_size=10, seed=0, num_shards=3, shard_index=0)


def test_the_train_stream_says_it_is_infinite():
    # Unknown length makes a multi-worker strategy all-reduce "has every
    # worker data left?" before each step.
    split = data.make_synthetic(0, num_train=100).train
    ds = data.train_dataset(split, global_batch_size=10, seed=0)
    assert ds.cardinality().numpy() == tf.data.INFINITE_CARDINALITY


@pytest.mark.parametrize("group", [1, 7, 20])
def test_batches_gathered_in_groups_are_the_epoch_permutation_in_order(monkeypatch, group):
    # 100 batches an epoch: groups of 7 leave 2 over, and a resumed run
    # starts part-way through a group.
    monkeypatch.setattr(data, "_GATHER_BATCHES", group)
    split = data.make_synthetic(0, num_train=1000).train
    for start in (0, 7, 95):
        got = batches(split, 130, global_batch_size=10, seed=4, start_step=start)
        for k, (x, y) in enumerate(got):
            epoch, b = divmod(start + k, 100)
            order = data.epoch_permutation(1000, 4, epoch).numpy()[b * 10 : (b + 1) * 10]
            np.testing.assert_array_equal(x, split.images[order])
            np.testing.assert_array_equal(y, split.labels[order])
            assert x.dtype == np.uint8  # pixels travel as stored


def test_shards_gathered_in_groups_are_the_halves_of_the_global_batch(monkeypatch):
    monkeypatch.setattr(data, "_GATHER_BATCHES", 7)
    split = data.make_synthetic(0, num_train=1000).train
    assert_two_shards_are_the_halves(split, 40, seed=2, start_step=90)


@pytest.mark.parametrize("bad", [1.5, float("nan")])
def test_labels_that_are_not_whole_numbers_are_refused_not_truncated(tmp_path, bad):
    folder = fake_idx_dir(tmp_path, gz=False)
    labels = np.zeros(50, ">f4")
    labels[7] = bad
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte holds the label "):
        data.load_idx("fashion_mnist", folder)
    labels[7] = 3.0  # whole numbers in a float file are classes
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    assert data.load_idx("fashion_mnist", folder).train.labels[7] == 3


def test_a_tfds_dataset_that_is_not_here_and_cannot_be_downloaded_fails_at_once(
    tmp_path, monkeypatch
):
    """TFDS would retry its download for minutes; without a network the run
    says so at once (the probe is answered "no" here, as it is offline)."""
    from tftrain import data
    from tftrain.errors import DataError

    monkeypatch.setattr(data, "can_reach_downloads", lambda timeout=5.0: False)
    with pytest.raises(DataError, match=r"--dataset=mnist is not prepared in .* cannot reach"):
        data.load("mnist", str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing left behind


def test_records_the_parsing_cannot_read_are_one_line_naming_the_reason():
    import tensorflow as tf

    from tftrain import inputs
    from tftrain.errors import DataError

    record = tf.train.Example(
        features=tf.train.Features(
            feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))}
        )
    ).SerializeToString()
    spec = {
        "x": tf.io.FixedLenFeature([1], tf.float32),
        "meta": tf.io.FixedLenFeature([1], tf.float32),
    }
    ds = tf.data.Dataset.from_tensors(record).map(lambda r: tf.io.parse_single_example(r, spec))
    with pytest.raises(DataError) as said:
        inputs._first(ds, object(), training=False)
    message = str(said.value)
    assert "the evaluation data cannot be read" in message
    assert "Feature: meta" in message and "{{" not in message

"""tftrain's TCP ring all-reduce, with its workers as threads on loopback."""

import socket
import threading

import numpy as np
import pytest
import tensorflow as tf

from tftrain import _malloc
from tftrain.distribute.ring import RingAllReduce, RingError, all_reduce_in_graph


def form_ring(size, timeout=20.0):
    rings = [RingAllReduce(rank, size, timeout) for rank in range(size)]
    addresses = [("127.0.0.1", ring.listen("127.0.0.1")) for ring in rings]
    errors = []

    def connect(ring):
        try:
            ring.connect(addresses)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=connect, args=(r,)) for r in rings]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return rings


def on_every_worker(rings, fn):
    """Runs fn(rank, ring) on a thread per worker; returns results by rank."""
    results, errors = [None] * len(rings), []

    def work(rank):
        try:
            results[rank] = fn(rank, rings[rank])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(rings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a ring worker hung"
    return results, errors


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 3, 1000, 235_146])
def test_sum_over_every_worker_and_bit_identical_results(size, length):
    rings = form_ring(size)
    try:
        rng = np.random.default_rng(length)
        inputs = [rng.standard_normal(length).astype(np.float32) for _ in range(size)]
        results, errors = on_every_worker(rings, lambda r, ring: ring.all_reduce(inputs[r]))
        assert not errors, errors
        expected = np.sum(np.stack(inputs).astype(np.float64), axis=0)
        for result in results:
            assert result.dtype == np.float32 and result.shape == (length,)
            np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
            # Each chunk is summed on one worker and copied: identical bits.
            np.testing.assert_array_equal(result, results[0])
        for r in range(size):  # inputs are not modified
            assert inputs[r] is not results[r]
    finally:
        for ring in rings:
            ring.close()


def test_repeated_reductions_of_other_shapes_and_dtypes():
    rings = form_ring(3)
    try:
        for step, (shape, dtype) in enumerate(
            [((4, 5), np.float32), ((7,), np.float64), ((2, 3, 2), np.float16), ((0,), np.float32)]
        ):
            inputs = [np.full(shape, r + step, dtype) for r in range(3)]
            results, errors = on_every_worker(
                rings, lambda r, ring, inputs=inputs: ring.all_reduce(inputs[r])
            )
            assert not errors
            for result in results:
                assert result.shape == shape and result.dtype == dtype
                np.testing.assert_array_equal(result, np.full(shape, 3 * step + 3, dtype))
    finally:
        for ring in rings:
            ring.close()


@pytest.mark.parametrize("size", [2, 3])
def test_many_arrays_are_one_buffer_to_the_ring(size):
    """Arrays of any shape (empty and scalar ones too) are summed as one
    buffer whose chunks straddle them; each sum is a new array that starts
    on a 64-byte boundary, so TensorFlow adopts it without a copy."""
    shapes = [(5, 3), (1,), (0,), (), (300, 7), (2,)]
    rings = form_ring(size)
    try:
        rng = np.random.default_rng(size)
        inputs = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(size)]
        kept = [[a.copy() for a in worker] for worker in inputs]
        results, errors = on_every_worker(rings, lambda r, ring: ring.all_reduce_many(*inputs[r]))
        assert not errors, errors
        for worker in results:
            assert [a.shape for a in worker] == shapes
            for i, result in enumerate(worker):
                expected = np.sum([inputs[r][i].astype(np.float64) for r in range(size)], axis=0)
                np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(result, results[0][i])
                assert result.size == 0 or result.ctypes.data % 64 == 0
        for worker, copy in zip(inputs, kept):  # inputs are only read
            for a, b in zip(worker, copy):
                np.testing.assert_array_equal(a, b)
    finally:
        for ring in rings:
            ring.close()


def test_more_arrays_than_one_system_call_takes():
    """A model with thousands of variables: more buffers than sendmsg and
    recvmsg_into accept at once (IOV_MAX, 1024 on Linux)."""
    rings = form_ring(2)
    try:
        inputs = [[np.full(3, r + i, np.float32) for i in range(2500)] for r in range(2)]
        results, errors = on_every_worker(rings, lambda r, ring: ring.all_reduce_many(*inputs[r]))
        assert not errors, errors
        for worker in results:
            assert len(worker) == 2500
            for i, result in enumerate(worker):
                np.testing.assert_array_equal(result, np.full(3, 2 * i + 1, np.float32))
    finally:
        for ring in rings:
            ring.close()


def test_a_worker_that_stops_fails_its_peers_at_once():
    rings = form_ring(2, timeout=30)
    try:
        rings[1].close()
        with pytest.raises(RingError, match="gone"):
            rings[0].all_reduce(np.ones(100_000, np.float32))
    finally:
        rings[0].close()


def test_a_worker_that_stalls_fails_its_peers_after_the_timeout():
    rings = form_ring(2, timeout=0.5)
    try:
        with pytest.raises(RingError, match="waited 0.5 s"):
            rings[0].all_reduce(np.ones(10, np.float32))  # rank 1 never takes part
    finally:
        for ring in rings:
            ring.close()


def test_a_stray_connection_does_not_take_a_worker_s_place():
    rings = [RingAllReduce(rank, 2, 10) for rank in range(2)]
    addresses = [("127.0.0.1", ring.listen("127.0.0.1")) for ring in rings]
    stray = socket.create_connection(addresses[0])
    stray.sendall(b"GET / HTTP/1.0\r\n\r\n")
    stray.close()
    _, errors = on_every_worker(rings, lambda r, ring: ring.connect(addresses))
    assert not errors
    try:
        results, errors = on_every_worker(
            rings, lambda r, ring: ring.all_reduce(np.array([r + 1.0], np.float32))
        )
        assert not errors and [float(x[0]) for x in results] == [3.0, 3.0]
    finally:
        for ring in rings:
            ring.close()


def test_a_worker_that_never_joins_is_reported():
    ring = RingAllReduce(0, 2, timeout=0.5)
    port = ring.listen("127.0.0.1")
    # Rank 1's address is our own listener: the connect succeeds, but nobody
    # ever connects to us as rank 1.
    with pytest.raises(RingError, match="did not join"):
        ring.connect([("127.0.0.1", port), ("127.0.0.1", port)])
    ring.close()


def test_in_graph_reduction_keeps_shapes_and_dtypes():
    class Doubling:  # a ring of two workers holding the same gradients
        def all_reduce_many(self, *arrays):
            return [a * 2 for a in arrays]

    grads = [
        tf.reshape(tf.range(12, dtype=tf.float32), [3, 4]),
        tf.constant([1.0, 2.0], tf.float64),
        tf.IndexedSlices(tf.ones([1, 4]), tf.constant([2]), tf.constant([3, 4])),
        tf.constant(5.0),
    ]

    @tf.function
    def reduce():
        return all_reduce_in_graph(Doubling(), grads)

    out = reduce()
    assert [g.dtype for g in out] == [tf.float32, tf.float64, tf.float32, tf.float32]
    np.testing.assert_array_equal(out[0], np.arange(12).reshape(3, 4) * 2)
    np.testing.assert_array_equal(out[1], [2.0, 4.0])
    np.testing.assert_array_equal(out[2], [[0] * 4, [0] * 4, [2] * 4])
    assert float(out[3]) == 10.0


def test_malloc_thresholds_are_raised_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert _malloc.tune() is True

"""tftrain's own gradient all-reduce between CPU workers: a ring over TCP.

TensorFlow's CPU collectives go through its gRPC worker service: on the
2-core machine tftrain is developed on, one all-reduce of a single float
costs about 1 ms of wall time and 0.8 ms of CPU in each process, and the
MLP's 0.94 MB of gradients 5-7 ms (BUILD_NOTES.md). The same bytes move
between two processes over a plain loopback socket in well under a
millisecond. ``RingAllReduce`` is that plain path: each worker holds one
connection to the next worker in the ring and one from the previous, and a
sum is a reduce-scatter followed by an all-gather (Patarasuk and Yuan
2009), 2(N-1)/N of the buffer in and out of each worker.

Every chunk of the result is summed on exactly one worker and then copied
to the others, so all workers end with bit-identical gradients.

The trainer calls :meth:`RingAllReduce.all_reduce_many` from inside its
graph (``tf.numpy_function``), once per step and dtype, on the gradients as
they are: the ring walks them as one logical buffer, so nothing is packed
into a flat buffer or split out of it, and each sum lands in a new array
aligned as TensorFlow needs, which TensorFlow adopts without a copy.

A peer that stops makes the next step fail at once (its connection
closes); a peer that stalls makes it fail after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import time

import numpy as np

_HELLO = struct.Struct("!4sII")  # magic, sender's rank, ring size
_MAGIC = b"tftr"
_SOCKET_BUFFER = 4 << 20
# TensorFlow takes over a NumPy result in place only at this alignment
# (Eigen's largest); any other result is copied once more.
_ALIGNMENT = 64
# Buffers per sendmsg/recvmsg_into: Linux refuses more than IOV_MAX (1024).
_MAX_VIEWS = 512


class RingError(RuntimeError):
    """A peer of the ring stopped, stalled or answered wrongly."""


def _chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    edges = [n * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _aligned_empty(size: int, dtype) -> np.ndarray:
    """A new 1-D array of ``size`` elements starting on an ``_ALIGNMENT`` boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(size * dtype.itemsize + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + size * dtype.itemsize].view(dtype)


def _pieces(buffers: list[np.ndarray], offsets: list[int], a: int, b: int) -> list[np.ndarray]:
    """The views of ``buffers`` (1-D, laid end to end from ``offsets``) that
    cover elements ``a`` to ``b`` of the whole."""
    views = []
    for buffer, start in zip(buffers, offsets):
        lo, hi = max(a - start, 0), min(b - start, buffer.size)
        if lo < hi:
            views.append(buffer[lo:hi])
    return views


class _Cursor:
    """How far a send or receive has got through a list of byte views."""

    def __init__(self, arrays: list[np.ndarray]):
        self.views = [memoryview(a).cast("B") for a in arrays if a.size]
        self.index, self.offset = 0, 0

    @property
    def done(self) -> bool:
        return self.index == len(self.views)

    def remaining(self) -> list[memoryview]:
        """The views left, at most ``_MAX_VIEWS`` of them (one system call's worth)."""
        rest = self.views[self.index + 1 : self.index + _MAX_VIEWS]
        return [self.views[self.index][self.offset :], *rest]

    def advance(self, n: int) -> None:
        while n:
            left = len(self.views[self.index]) - self.offset
            if n < left:
                self.offset += n
                return
            n -= left
            self.index, self.offset = self.index + 1, 0


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


def _recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        part = sock.recv(n - len(data))
        if not part:
            raise RingError("a peer closed its connection while the ring was forming")
        data += part
    return bytes(data)


class RingAllReduce:
    """Sums NumPy buffers over ``size`` workers connected in a ring.

    Build it with :meth:`listen` then :meth:`connect`: every worker must
    be listening before any connects, so the caller exchanges the ports
    between the two calls.

    Args:
      rank: this worker's place in the ring, 0 to size - 1.
      size: the number of workers.
      timeout: seconds a step may wait for a peer before it fails.
    """

    def __init__(self, rank: int, size: int, timeout: float):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside a ring of {size}")
        self.rank, self.size, self.timeout = rank, size, float(timeout)
        self._listener: socket.socket | None = None
        self._right: socket.socket | None = None  # we send to rank + 1
        self._left: socket.socket | None = None  # we receive from rank - 1
        self._selector: selectors.BaseSelector | None = None
        # The RingError that failed a step run inside a graph: TensorFlow
        # reports it as an UnknownError, so it is kept here to be told apart.
        self.failure: RingError | None = None

    # -- forming the ring --------------------------------------------------

    def listen(self, host: str, port: int = 0) -> int:
        """Opens this worker's listening socket on ``host`` and ``port`` (0: a
        free one); returns its port."""
        if self.size == 1:
            return 0
        self._listener = socket.create_server((host, port), backlog=4)
        return self._listener.getsockname()[1]

    def connect(self, addresses: list[tuple[str, int]]) -> None:
        """Connects to the next worker and accepts the previous one.

        Args:
          addresses: ``(host, port)`` that :meth:`listen` returned, by rank.
        """
        if self.size == 1:
            return
        deadline = time.monotonic() + self.timeout
        host, port = addresses[(self.rank + 1) % self.size]
        right = socket.create_connection((host, port), timeout=self.timeout)
        _tune(right)
        right.sendall(_HELLO.pack(_MAGIC, self.rank, self.size))
        expected = (self.rank - 1) % self.size
        self._listener.settimeout(self.timeout)
        while True:
            try:
                left, _ = self._listener.accept()
            except TimeoutError:
                raise RingError(
                    f"worker {expected} did not join the gradient ring within {self.timeout:g} s"
                ) from None
            _tune(left)
            try:
                magic, rank, size = _HELLO.unpack(_recv_exactly(left, _HELLO.size, deadline))
            except (OSError, RingError, struct.error):
                left.close()  # not a ring peer (a port scan, a stray client)
                continue
            if magic == _MAGIC and rank == expected and size == self.size:
                break
            left.close()
        self._listener.close()
        self._listener = None
        for sock in (left, right):
            sock.setblocking(False)
        self._left, self._right = left, right
        self._selector = selectors.DefaultSelector()

    def close(self) -> None:
        for sock in (self._listener, self._left, self._right):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._listener = self._left = self._right = self._selector = None

    # -- one all-reduce ----------------------------------------------------

    def all_reduce(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``values`` over every worker (a new array)."""
        return self.all_reduce_many(values)[0]

    def all_reduce_many(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """The element-wise sums of ``arrays`` (one dtype) over every worker:
        new arrays of their shapes, each aligned for TensorFlow."""
        try:
            return self._all_reduce(arrays)
        except RingError as e:
            self.failure = e
            raise

    def reduce_in_graph(self, gradients: list) -> list:
        """Sums ``gradients`` over the ring from inside a tf.function."""
        return all_reduce_in_graph(self, gradients)

    def _all_reduce(self, arrays) -> list[np.ndarray]:
        arrays = [np.asarray(a) for a in arrays]
        inputs = [a.reshape(-1) for a in arrays]
        results = [_aligned_empty(a.size, a.dtype) for a in inputs]
        total = sum(a.size for a in inputs)
        if self.size == 1 or total == 0:
            for result, values in zip(results, inputs):
                result[...] = values
        elif self._right is None:
            raise RingError("the gradient ring is not connected")
        else:
            self._ring(inputs, results, total)
        return [r.reshape(a.shape) for r, a in zip(results, arrays)]

    def _ring(self, inputs: list[np.ndarray], results: list[np.ndarray], total: int) -> None:
        """Reduce-scatter then all-gather over ``inputs`` taken end to end as
        one buffer of ``total`` elements, into ``results``."""
        n, rank = self.size, self.rank
        bounds = _chunk_bounds(total, n)
        offsets = [0]
        for values in inputs[:-1]:
            offsets.append(offsets[-1] + values.size)

        def chunk(buffers, k):
            return _pieces(buffers, offsets, *bounds[k % n])

        # Every chunk of the results is written once before it is read: by
        # the partial sum received into it (to which this worker's values
        # are then added), or by the copy of a finished sum received. The
        # inputs are only read.
        for s in range(n - 1):  # reduce-scatter: chunk rank+1 ends summed here
            incoming = chunk(results, rank - s - 1)
            self._exchange(chunk(inputs if s == 0 else results, rank - s), incoming)
            for partial, values in zip(incoming, chunk(inputs, rank - s - 1)):
                np.add(partial, values, out=partial)
        for s in range(n - 1):  # all-gather: pass the summed chunks round
            self._exchange(chunk(results, rank + 1 - s), chunk(results, rank - s))

    def _exchange(self, outgoing: list[np.ndarray], incoming: list[np.ndarray]) -> None:
        """Sends ``outgoing`` right while filling ``incoming`` from the left."""
        send, recv = _Cursor(outgoing), _Cursor(incoming)
        selector = self._selector
        deadline = time.monotonic() + self.timeout
        while not (send.done and recv.done):
            if not send.done:
                try:
                    send.advance(self._right.sendmsg(send.remaining()))
                except BlockingIOError:
                    pass
                except OSError as e:
                    raise self._lost("the next", e) from None
            if not recv.done:
                try:
                    got = self._left.recvmsg_into(recv.remaining())[0]
                except BlockingIOError:
                    got = None
                except OSError as e:
                    raise self._lost("the previous", e) from None
                if got == 0:
                    raise self._lost("the previous", "connection closed")
                recv.advance(got or 0)
            if not (send.done and recv.done):
                # Left and right are always two sockets, even in a ring of two.
                waiting = {}
                if not send.done:
                    waiting[self._right] = selectors.EVENT_WRITE
                if not recv.done:
                    waiting[self._left] = selectors.EVENT_READ
                for sock, events in waiting.items():
                    selector.register(sock, events)
                try:
                    ready = selector.select(max(deadline - time.monotonic(), 0.0))
                finally:
                    for sock in waiting:
                        selector.unregister(sock)
                if not ready and time.monotonic() >= deadline:
                    raise RingError(
                        f"the gradient all-reduce waited {self.timeout:g} s for a peer "
                        f"(worker {self.rank} of {self.size}): a worker stalled"
                    )

    def _lost(self, which: str, cause) -> RingError:
        return RingError(f"{which} worker in the gradient ring is gone ({cause}): a worker stopped")


def loopback_pair(rank: int, ports: list[int], timeout: float = 60.0) -> RingAllReduce:
    """One end of a ring of 2 processes on 127.0.0.1 (``ports`` by rank),
    this process pinned to a core of its own where there are two: how the
    benchmarks and ``tftrain plan`` time the ring without TensorFlow."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    ring = RingAllReduce(rank, 2, timeout=timeout)
    ring.listen("127.0.0.1", ports[rank])
    time.sleep(0.5)  # both listening before either connects
    ring.connect([("127.0.0.1", p) for p in ports])
    return ring


def all_reduce_in_graph(reducer, gradients: list) -> list:
    """Sums ``gradients`` (tensors) over the ring, from inside a tf.function.

    One exchange per dtype whatever the number of variables: the gradients
    of a dtype go to ``reducer.all_reduce_many`` in one call. Sparse
    gradients (``tf.IndexedSlices``) are summed as dense tensors.
    """
    import tensorflow as tf

    gradients = [tf.convert_to_tensor(g) for g in gradients]
    summed: list = [None] * len(gradients)
    by_dtype: dict = {}
    for i, g in enumerate(gradients):
        by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, positions in by_dtype.items():
        parts = [gradients[i] for i in positions]
        totals = tf.numpy_function(
            reducer.all_reduce_many, parts, [dtype] * len(parts), stateful=True
        )
        for i, total, g in zip(positions, totals, parts):
            total.set_shape(g.shape)
            summed[i] = total
    return summed

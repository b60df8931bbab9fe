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

The trainer calls :meth:`RingAllReduce.all_reduce` from inside its graph
(``tf.numpy_function``), once per step, on the gradients packed into one
flat buffer per dtype.

A peer that stops makes the next step fail at once (its connection
closes); a peer that stalls makes it fail after ``timeout`` seconds.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time

import numpy as np

_HELLO = struct.Struct("!4sII")  # magic, sender's rank, ring size
_MAGIC = b"tftr"
_SOCKET_BUFFER = 4 << 20


class RingError(RuntimeError):
    """A peer of the ring stopped, stalled or answered wrongly."""


def _chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    edges = [n * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


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
        try:
            return self._all_reduce(values)
        except RingError as e:
            self.failure = e
            raise

    def reduce_in_graph(self, gradients: list) -> list:
        """Sums ``gradients`` over the ring from inside a tf.function."""
        return all_reduce_in_graph(self, gradients)

    def _all_reduce(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        flat = values.reshape(-1)
        if self.size == 1 or flat.size == 0:
            return flat.copy().reshape(values.shape)
        if self._right is None:
            raise RingError("the gradient ring is not connected")
        n, rank = self.size, self.rank
        bounds = _chunk_bounds(flat.size, n)
        # Every chunk of ``result`` is written once before it is read: by the
        # sum that lands in it, or by the copy of a summed chunk received.
        # ``values`` itself is only read.
        result = np.empty_like(flat)
        scratch = np.empty(max(b - a for a, b in bounds), flat.dtype)
        for s in range(n - 1):  # reduce-scatter: chunk rank+1 ends summed here
            a, b = bounds[(rank - s) % n]
            c, d = bounds[(rank - s - 1) % n]
            self._exchange((flat if s == 0 else result)[a:b], scratch[: d - c])
            np.add(flat[c:d], scratch[: d - c], out=result[c:d])
        for s in range(n - 1):  # all-gather: pass the summed chunks round
            a, b = bounds[(rank + 1 - s) % n]
            c, d = bounds[(rank - s) % n]
            self._exchange(result[a:b], result[c:d])
        return result.reshape(values.shape)

    def _exchange(self, outgoing: np.ndarray, incoming: np.ndarray) -> None:
        """Sends ``outgoing`` right while filling ``incoming`` from the left."""
        send = memoryview(outgoing).cast("B")
        recv = memoryview(incoming).cast("B")
        sent = received = 0
        selector = self._selector
        deadline = time.monotonic() + self.timeout
        while sent < len(send) or received < len(recv):
            if sent < len(send):
                try:
                    sent += self._right.send(send[sent:])
                except BlockingIOError:
                    pass
                except OSError as e:
                    raise self._lost("the next", e) from None
            if received < len(recv):
                try:
                    got = self._left.recv_into(recv[received:])
                except BlockingIOError:
                    got = None
                except OSError as e:
                    raise self._lost("the previous", e) from None
                if got == 0:
                    raise self._lost("the previous", "connection closed")
                received += got or 0
            if sent < len(send) or received < len(recv):
                # Left and right are always two sockets, even in a ring of two.
                waiting = {}
                if sent < len(send):
                    waiting[self._right] = selectors.EVENT_WRITE
                if received < len(recv):
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


def all_reduce_in_graph(reducer: RingAllReduce, gradients: list) -> list:
    """Sums ``gradients`` (tensors) over the ring, from inside a tf.function.

    The gradients are packed into one flat buffer per dtype, so a step makes
    one exchange per dtype whatever the number of variables. Sparse
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
        flat = tf.concat([tf.reshape(g, [-1]) for g in parts], axis=0)
        total = tf.numpy_function(reducer.all_reduce, [flat], dtype, stateful=True)
        total.set_shape(flat.shape)
        sizes = [tf.size(g) for g in parts]
        for i, piece, g in zip(positions, tf.split(total, tf.stack(sizes)), parts):
            summed[i] = tf.reshape(piece, tf.shape(g))
    return summed

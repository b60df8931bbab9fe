"""How the launchers of a cluster that spans machines agree on it:
``tftrain launch --nnodes=N --node_rank=I --coordinator=HOST:PORT``.

Node 0's launcher serves the rendezvous on HOST:PORT; every launcher (node
0's too) connects, reserves its workers' ports, and sends its rank, the
address the others reach it at, those ports and a fingerprint of its flags.
Once all N have come, each gets the whole cluster (workers in node order:
node I's are workers I*W .. I*W+W-1) and starts its own tasks. The
connection stays open for the run: a launcher whose task failed, or that
was interrupted, says so, and the server tells every node, so that the
cluster restarts together (a new round: new ports, the last checkpoint) or
stops together (every task saves). Messages are JSON lines; every wait is
bounded.
"""

from __future__ import annotations

import hashlib
import json
import math
import select
import socket
import threading
import time

from tftrain.errors import ConfigError

# An event a node sends and the server passes to every node.
FAILED, STOP = "failed", "stop"


def fingerprint(argv: list[str], nnodes: int, num_workers: int) -> str:
    """What every node must agree on: the training flags and the shape."""
    text = json.dumps([argv, nnodes, num_workers])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_address(value: str, flag: str = "--coordinator") -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag}={value!r}: expected HOST:PORT, e.g. 10.0.0.1:29400.")
    return host.strip("[]"), int(port)


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


class _Lines:
    """JSON lines from a socket, with a deadline on each."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buffer = conn, b""

    def ready(self) -> bool:
        return b"\n" in self.buffer or bool(select.select([self.conn], [], [], 0)[0])

    def read(self, timeout: float) -> dict | None:
        """The next message; None at the end of the stream. Raises
        TimeoutError, or ValueError for a line that is not a JSON object."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            wait = None if math.isinf(left) else left  # select's "forever"
            if left <= 0 or not select.select([self.conn], [], [], wait)[0]:
                raise TimeoutError
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        return message


class Server:
    """Node 0's rendezvous: rounds of N nodes, and their events."""

    def __init__(self, host: str, port: int, nnodes: int, timeout: float):
        self.nnodes, self.timeout = nnodes, timeout
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
        except OSError as e:
            self.listener.close()
            raise ConfigError(
                f"--coordinator={host}:{port}: node 0 cannot listen there ({e.strerror or e}): "
                "give an address of this machine and a free port."
            ) from None
        self.listener.listen(nnodes * 4)
        self._lock = threading.Lock()
        self._rounds: dict[int, dict[int, tuple[socket.socket, dict]]] = {}
        self._members: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        lines = _Lines(conn)
        try:
            hello = lines.read(self.timeout)
            if not hello or "node_rank" not in hello:
                conn.close()
                return
            self._join(conn, hello)
            while True:
                message = lines.read(float("inf"))
                if message is None:
                    return
                if message.get("event") in (FAILED, STOP):
                    self._broadcast(message, conn)
        except (OSError, TimeoutError, ValueError):
            conn.close()

    def _join(self, conn: socket.socket, hello: dict) -> None:
        round_ = int(hello.get("round", 0))
        with self._lock:
            members = self._rounds.setdefault(round_, {})
            first = next(iter(members.values()), None)
            rank = int(hello["node_rank"])
            said = None
            if rank in members:
                said = f"node_rank {rank} joined twice"
            elif first is not None and first[1]["fingerprint"] != hello.get("fingerprint"):
                theirs, mine = set(first[1].get("flags", [])), set(hello.get("flags", []))
                differ = sorted(mine ^ theirs)
                said = (
                    f"node {rank}'s flags differ from node {next(iter(members))}'s"
                    + (f" ({', '.join(differ[:4])})" if differ else "")
                    + ": every node must run the same tftrain launch command but --node_rank"
                )
            if said:
                # Every node of the round hears it: none waits out its timeout.
                for member, _ in [(conn, None), *members.values()]:
                    try:
                        _send(member, {"error": said})
                    except OSError:
                        pass
                conn.close()
                return
            members[rank] = (conn, hello)
            self._members.append(conn)
            if len(members) < self.nnodes:
                return
            spec = {"worker": [a for r in sorted(members) for a in members[r][1]["addresses"]]}
            for member, _ in members.values():
                try:
                    _send(member, {"round": round_, "cluster": spec})
                except OSError:
                    pass

    def _broadcast(self, message: dict, sender: socket.socket) -> None:
        with self._lock:
            for member in self._members:
                if member is not sender:
                    try:
                        _send(member, message)
                    except OSError:
                        pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()


class Node:
    """One launcher's side: join a round, then send and receive events."""

    def __init__(
        self,
        coordinator: tuple[str, int],
        node_rank: int,
        timeout: float,
        key: str,
        flags: list[str] | None = None,
    ):
        self.coordinator, self.node_rank = coordinator, node_rank
        self.timeout, self.key, self.flags = timeout, key, list(flags or [])
        self.conn: socket.socket | None = None
        self.lines: _Lines | None = None

    def _connect(self) -> socket.socket:
        """A connection to the coordinator, tried until the timeout (node 0's
        launcher may start after this one). Raises ConfigError."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return socket.create_connection(self.coordinator, timeout=5)
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"cannot reach the coordinator {self.coordinator[0]}:"
                        f"{self.coordinator[1]} ({e.strerror or e}) within "
                        f"{self.timeout:g} s (--rendezvous_timeout_secs): is node 0's "
                        "tftrain launch running?"
                    ) from None
                time.sleep(0.5)

    def local_host(self) -> str:
        """The address of this machine that reaches the coordinator."""
        with self._connect() as probe:
            return probe.getsockname()[0]

    def join(self, round_: int, addresses: list[str]) -> dict[str, list[str]]:
        """The cluster of round ``round_`` once every node has come.
        Raises ConfigError when it cannot be formed in time."""
        self.close()
        deadline = time.monotonic() + self.timeout
        self.conn = self._connect()
        self.lines = _Lines(self.conn)
        _send(
            self.conn,
            {
                "round": round_,
                "node_rank": self.node_rank,
                "addresses": addresses,
                "fingerprint": self.key,
                "flags": self.flags,
            },
        )
        try:
            while True:
                reply = self.lines.read(max(deadline - time.monotonic(), 0.1))
                if reply is None:
                    raise ConfigError("the coordinator closed the rendezvous.")
                if "error" in reply:
                    raise ConfigError(f"the rendezvous failed: {reply['error']}.")
                if "cluster" in reply:
                    return reply["cluster"]
                # An event of the round before, from a node that left late.
        except TimeoutError:
            raise ConfigError(
                f"not every node joined within {self.timeout:g} s "
                "(--rendezvous_timeout_secs): start tftrain launch on each of the "
                "--nnodes machines with the same flags and its own --node_rank."
            ) from None

    def tell(self, event: str, round_: int, **extra) -> None:
        if self.conn is not None:
            try:
                _send(self.conn, {"event": event, "round": round_, **extra})
            except OSError:
                pass

    def poll(self, round_: int) -> dict | None:
        """An event another node sent in round ``round_``, if one has come
        (a late one of an earlier round is dropped); else None."""
        while self.lines is not None:
            try:
                if not self.lines.ready():
                    return None
                message = self.lines.read(1.0)
            except (OSError, TimeoutError, ValueError):
                return None
            if message is None:  # node 0's launcher has ended: its tasks too
                self.lines = None
                return None
            if message.get("round") == round_ and message.get("event") in (FAILED, STOP):
                return message
        return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = self.lines = None

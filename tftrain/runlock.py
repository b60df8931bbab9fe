"""One run per folder: a lock in ``--model_dir`` for the life of a run.

Two runs writing one folder would each overwrite the other's checkpoints
and metrics, and ``--restart`` would move a live run's files away under
it. So the task that writes the folder (the only process, or the chief)
holds an exclusive ``flock`` on ``model_dir/.tftrain-lock`` from before
``--restart`` moves anything until it ends, and then removes the file; the
kernel releases the lock when the process dies, however it dies, so a
killed run never leaves the folder locked (only the file, which the next
run takes over). The file names the holder (host, pid, when, the command),
for the one line that refuses a second run. ``tftrain launch`` holds the
lock for its cluster (its tasks are told so in their environment), so
that the lock covers a restart of the cluster too.

Where the filesystem has no locks, the run goes on unlocked (said once).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys

from tftrain.errors import ConfigError

LOCK_NAME = ".tftrain-lock"
# Set by tftrain launch in its tasks' environment: the folder it holds locked.
HELD_FOR = "TFTRAIN_LOCK_HELD_FOR"


class FolderLock:
    """Holds ``model_dir``'s lock; ``release`` (or the process's end) frees it."""

    def __init__(self, model_dir: str, log=None):
        self.model_dir = model_dir
        self._fd: int | None = None
        self._created = False
        self._log = log or (lambda line: None)

    def acquire(self) -> FolderLock:
        """Raises ConfigError (one line naming the live run) when another
        process holds the folder."""
        import fcntl

        self._created = self._created or not os.path.isdir(self.model_dir)
        try:
            os.makedirs(self.model_dir, exist_ok=True)
            fd = os.open(os.path.join(self.model_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise ConfigError(
                f"--model_dir={self.model_dir} cannot be written: {e.strerror or e}{where}."
            ) from None
        path = os.path.join(self.model_dir, LOCK_NAME)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise ConfigError(
                f"--model_dir={self.model_dir} is in use by a live run ({holder}): two runs "
                "in one folder would overwrite each other. Wait for it to end, stop it, or "
                "use another --model_dir. Nothing was changed."
            ) from None
        except OSError as e:  # a filesystem without locks (some network mounts)
            self._log(
                f"Note: {self.model_dir} cannot be locked ({e.strerror or e}): nothing "
                "stops a second run from using the same folder."
            )
        else:
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if not same:  # a run that ended removed the file this one locked
                os.close(fd)
                return self.acquire()
        self._fd = fd
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError:  # the record is for people; the lock holds without it
            pass
        return self

    def release(self) -> None:
        """Removes the lock file (the folder is left as the run left it) and
        lets go; a folder this run created and left empty goes too."""
        if self._fd is None:
            return
        try:
            os.remove(os.path.join(self.model_dir, LOCK_NAME))
            if self._created and not os.listdir(self.model_dir):
                os.rmdir(self.model_dir)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


class NoLock:
    def release(self) -> None:
        pass


# TensorFlow's filesystems (gs://, s3://) have no locks to take.
_NO_LOCKS = (
    "note: --model_dir={}: a bucket has no locks, so nothing stops a second run "
    "from writing this folder while this one does: start one run per folder."
)


def for_launcher(model_dir: str):
    """The lock ``tftrain launch`` holds for its cluster (a stand-in for a URL)."""
    from tftrain import fileio

    if fileio.is_url(model_dir):
        return NoLock()
    return FolderLock(model_dir).acquire()


def for_task(model_dir: str, cluster, log=None):
    """The folder's lock, taken, when this task writes the folder and no
    launcher holds it for it; else a stand-in."""
    from tftrain import fileio

    if cluster is not None and not cluster.is_chief:
        return NoLock()
    if fileio.is_url(model_dir):
        if log:
            log(_NO_LOCKS.format(model_dir))
        return NoLock()
    held = os.environ.get(HELD_FOR)
    if held and os.path.abspath(held) == os.path.abspath(model_dir):
        return NoLock()
    return FolderLock(model_dir, log).acquire()


def _read(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "its holder did not say who it is"
    said = f"pid {record['pid']} on {record.get('host', '?')}"
    if record.get("started"):
        said += f", started {record['started']}"
    if record.get("command"):
        said += f": {record['command'][:200]}"
    return said

"""What this process may use of the machine: one answer for every module."""

from __future__ import annotations

import os

# More pool threads than this is never useful on one machine, and TensorFlow
# hangs creating tens of thousands of them.
MAX_THREADS = 1024


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def core_share(position: int, tasks: int) -> list[int] | None:
    """The cores of task ``position`` of ``tasks`` on this machine when each
    gets cores of its own (None: too few to go round, or no affinity here)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    per_task = len(cores) // max(tasks, 1)
    if per_task < 1:
        return None
    return cores[position * per_task : (position + 1) * per_task]


def pin(pid: int, cores) -> None:
    """Keeps process ``pid`` (0: this one) and the threads it starts later on
    ``cores``; nothing where that cannot be done."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(pid, set(cores))
    except OSError:  # the process already exited, or a container forbids it
        pass


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cluster_inter_op_threads(num_workers: int) -> int:
    """Inter-op threads for a task of a cluster with ``num_workers`` workers.

    Collectives and parameter-server RPCs block inter-op threads; with fewer
    than workers + 1 of them a small machine deadlocks.
    """
    return max(num_workers + 1, 2)


def prepare_memory() -> None:
    """How a tftrain process allocates, set before TensorFlow allocates
    anything: TensorFlow's CPU tensors from a pool, and glibc's large
    buffers reused instead of mapped afresh (BUILD_NOTES.md)."""
    from tftrain import _internal, _malloc

    _internal.pool_cpu_memory()
    _malloc.tune()


def configure_threads(intra_op: int = 0, inter_op: int = 0, spinning: bool = True) -> None:
    """Sizes TensorFlow's thread pools (0 leaves TensorFlow's default).

    ``spinning=False`` stops idle pool threads from spinning while they wait
    for work: right for a process that shares its cores with other tasks
    (spinning there takes CPU the peers need; measured in BUILD_NOTES.md).
    Call before any other TensorFlow work.
    """
    import tensorflow as tf

    from tftrain import _internal

    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    if not spinning:
        _internal.disable_thread_spinning()


def local_devices(count: int, flag: str) -> list[str]:
    """``count`` GPUs where there are enough, else ``count`` logical CPU devices
    (set up before any other TensorFlow work). ``flag`` names the setting
    that asked for them, for the error when TensorFlow started with fewer."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= count:
        return [f"/gpu:{i}" for i in range(count)]
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:  # already initialised (a test process): use what is there
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            from tftrain.errors import ConfigError

            raise ConfigError(
                f"{flag}={count}: TensorFlow was already started with "
                f"{have} CPU device(s); logical devices must be set up before any "
                "other TensorFlow work."
            ) from None
    return [f"/cpu:{i}" for i in range(count)]

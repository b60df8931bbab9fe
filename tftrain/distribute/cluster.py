"""TF_CONFIG: parsed and validated in one place, one clear message per mistake.

``TF_CONFIG`` is JSON: ``{"cluster": {"worker": ["host:port", ...],
"chief": [...], "ps": [...]}, "task": {"type": "worker", "index": 0}}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping

from tftrain.errors import ConfigError

# The roles a task can have, and what each does when it starts. Which roles
# train and which serve is up to the parallel mode (ParallelMode.training_roles).
ROLES = {
    "chief": "trains and alone writes --model_dir; under a coordinator, the coordinator",
    "worker": "trains, or runs the steps a coordinator schedules on it",
    "ps": "holds variables for the workers (a parameter server)",
    "evaluator": "evaluates checkpoints beside the training tasks",
}
TASK_TYPES = tuple(ROLES)
_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """Where this process stands in its cluster."""

    cluster: Mapping[str, tuple[str, ...]]
    task_type: str
    task_index: int

    @property
    def num_workers(self) -> int:
        """Tasks that train: workers plus the chief, if any."""
        return len(self.cluster.get("worker", ())) + len(self.cluster.get("chief", ()))

    @property
    def is_chief(self) -> bool:
        """The chief task, or worker 0 when the cluster has no chief."""
        if "chief" in self.cluster:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def address(self) -> str:
        return self.cluster[self.task_type][self.task_index]

    def host_of(self, task_type: str, index: int) -> str:
        return self.cluster[task_type][index].rsplit(":", 1)[0].strip("[]")

    def training_tasks(self) -> list[tuple[str, int]]:
        """The chief and the workers, in rank order."""
        return sorted(
            (t, i) for t in ("chief", "worker") for i in range(len(self.cluster.get(t, ())))
        )


def parse_tf_config(raw: str | None) -> ClusterInfo | None:
    """Parses and validates the text of ``TF_CONFIG``.

    Returns:
      None when ``raw`` is unset or empty (a single-process run).

    Raises:
      ConfigError: naming what is wrong and what is expected.
    """
    if raw is None or not raw.strip():
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"TF_CONFIG is not valid JSON ({e.msg} at character "
            f"{e.pos}): expected an object like "
            '{"cluster": {"worker": ["host:port"]}, '
            '"task": {"type": "worker", "index": 0}}.'
        ) from None
    if not isinstance(spec, dict):
        raise ConfigError(
            f"TF_CONFIG is a JSON {type(spec).__name__}: expected "
            "an object with 'cluster' and 'task'."
        )
    cluster = spec.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError(
            "TF_CONFIG has no 'cluster': expected a mapping from task "
            "type (chief, worker, ps) to a list of host:port addresses."
        )
    parsed: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for task_type, addresses in cluster.items():
        if task_type not in TASK_TYPES:
            raise ConfigError(
                f"TF_CONFIG cluster has task type {task_type!r}: expected {', '.join(TASK_TYPES)}."
            )
        if not isinstance(addresses, list) or not addresses:
            raise ConfigError(
                f"TF_CONFIG cluster[{task_type!r}] is {addresses!r}: "
                "expected a non-empty list of host:port strings."
            )
        for i, address in enumerate(addresses):
            where = f"TF_CONFIG cluster[{task_type!r}][{i}]"
            if not isinstance(address, str) or not (m := _ADDRESS.match(address)):
                raise ConfigError(f"{where} is {address!r}: expected host:port.")
            if not 0 < int(m["port"]) < 65536:
                raise ConfigError(f"{where} is {address!r}: port {m['port']} is outside 1-65535.")
            if address in seen:
                raise ConfigError(
                    f"{where} is {address!r}, the same address as "
                    f"{seen[address]}: every task needs its own port."
                )
            seen[address] = where
        parsed[task_type] = tuple(addresses)
    if len(parsed.get("chief", ())) > 1:
        raise ConfigError(
            f"TF_CONFIG cluster has {len(parsed['chief'])} chiefs: expected at most one."
        )
    task = spec.get("task")
    if not isinstance(task, dict):
        raise ConfigError(
            'TF_CONFIG has no \'task\': expected {"type": "<chief|worker|ps>", "index": <n>}.'
        )
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in parsed:
        raise ConfigError(
            f"TF_CONFIG task type {task_type!r} is not in the cluster, "
            f"which has {', '.join(parsed)}."
        )
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"TF_CONFIG task index {index!r}: expected an integer >= 0.")
    if index >= len(parsed[task_type]):
        raise ConfigError(
            f"TF_CONFIG task index {index} is out of range: cluster "
            f"has {len(parsed[task_type])} {task_type} task(s), "
            f"indices 0-{len(parsed[task_type]) - 1}."
        )
    return ClusterInfo(parsed, task_type, index)


def from_environment(config=None) -> ClusterInfo | None:
    """Reads and validates ``TF_CONFIG`` from the environment (the strategy
    checks that its roles fit: ParallelMode.check); without one, in a Slurm
    step of several tasks, resolves it from Slurm's (``distribute/slurm.py``)
    and sets it, for TensorFlow."""
    from tftrain.distribute import slurm

    if "TF_CONFIG" not in os.environ and config is not None and slurm.in_step():
        os.environ["TF_CONFIG"] = slurm.tf_config(config)
    return parse_tf_config(os.environ.get("TF_CONFIG"))


_PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")


def keep_off_proxies(cluster: ClusterInfo, environ=os.environ) -> None:
    """gRPC sends its channels through the HTTP proxy an environment names
    (``grpc_proxy``, ``https_proxy``, ``http_proxy``): the tasks of a
    cluster would reach each other through it, or never. Their hosts are
    added to ``no_grpc_proxy`` (which gRPC reads before ``no_proxy``, so
    that is kept in it); other traffic (a bucket) still takes the proxy."""
    if not any(environ.get(name) for name in _PROXY_VARIABLES):
        return
    hosts = sorted(
        {
            address.rsplit(":", 1)[0]
            for addresses in cluster.cluster.values()
            for address in addresses
        }
    )
    kept = environ.get("no_grpc_proxy") or environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    listed = [h.strip() for h in kept.split(",") if h.strip()]
    environ["no_grpc_proxy"] = ",".join(listed + [h for h in hosts if h not in listed])

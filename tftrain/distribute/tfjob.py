"""``tftrain launch --emit=tfjob``: the same cluster as a Kubeflow TFJob.

The manifest runs the image built from the repository's ``Dockerfile``.
Each replica declares the ports tftrain opens: TensorFlow's gRPC server
(2222, the TFJob operator's default, which it also puts in TF_CONFIG) and,
for multi-worker runs on the CPU, tftrain's gradient ring (``RING_PORT``).
"""

from __future__ import annotations

import json
import os
import re
import sys

from tftrain import registry
from tftrain.config import ConfigError
from tftrain.resources import cluster_inter_op_threads

GRPC_PORT = 2222  # the TFJob operator's default port, in TF_CONFIG
RING_PORT = 2223
# What each task requests (and the memory it is limited to), unless told.
DEFAULT_CPU, DEFAULT_MEMORY = "2", "4Gi"
# Pod names are "<job>-<role>-<index>": DNS labels of at most 63 characters.
MAX_JOB_NAME = 48
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def check_for_kubernetes(
    config, job_name: str, cpu: str = DEFAULT_CPU, memory: str = DEFAULT_MEMORY
) -> None:
    """What a local run would accept but a pod would not: raises ConfigError."""
    if not _DNS_LABEL.match(job_name) or len(job_name) > MAX_JOB_NAME:
        raise ConfigError(
            f"--job_name={job_name!r}: Kubernetes needs lower-case letters, digits and "
            f"'-', starting and ending with a letter or digit, at most {MAX_JOB_NAME} "
            "characters (pod names add the role and index)."
        )
    if "://" not in config.model_dir and not os.path.isabs(config.model_dir):
        raise ConfigError(
            f"--model_dir={config.model_dir} is relative: every pod needs the same "
            "absolute path on a volume they share (e.g. /mnt/runs/NAME), or a URL "
            "(gs://...)."
        )
    where = registry.split_spec(config.experiment or "")[0]
    if config.experiment and where not in registry.names() and registry.is_file_spec(where):
        if not os.path.isabs(where):
            raise ConfigError(
                f"--experiment={config.experiment}: a relative path, which pods would look "
                "for in the image's working folder: give the file's absolute path inside "
                "the image (COPY it in: see the README), e.g. --experiment=/app/my_exp.py."
            )
        print(
            f"[launch] note: every pod runs --experiment={config.experiment}: the image "
            f"must hold {where} (a file on this machine is not in the pods).",
            file=sys.stderr,
        )
    for name, value in (("task_cpu", cpu), ("task_memory", memory)):
        if not _QUANTITY.match(value):
            raise ConfigError(
                f"--{name}={value!r}: expected a Kubernetes quantity (e.g. 2, 500m, 4Gi)."
            )


def tfjob_manifest(
    *,
    job_name: str,
    image: str,
    num_workers: int,
    num_ps: int,
    train_argv: list[str],
    cpu: str = DEFAULT_CPU,
    memory: str = DEFAULT_MEMORY,
    evaluator: bool = False,
) -> str:
    """A Kubeflow TFJob whose operator sets TF_CONFIG for every replica
    (with ``evaluator``, one Evaluator replica too: task type ``evaluator``).

    JSON-quoted strings keep it valid YAML whatever the flags hold.
    """
    command = json.dumps(
        [
            "tftrain",
            "train",
            f"--inter_op_threads={cluster_inter_op_threads(num_workers)}",
            f"--ring_port={RING_PORT}",
            *train_argv,
        ]
    )
    lines = [
        "apiVersion: kubeflow.org/v1",
        "kind: TFJob",
        "metadata:",
        f"  name: {json.dumps(job_name)}",
        "spec:",
        "  tfReplicaSpecs:",
    ]
    roles = (
        ([("Chief", 1)] if num_ps else [])
        + [("Worker", num_workers)]
        + ([("PS", num_ps)] if num_ps else [])
        + ([("Evaluator", 1)] if evaluator else [])
    )
    for role, replicas in roles:
        lines += [
            f"    {role}:",
            f"      replicas: {replicas}",
            "      restartPolicy: OnFailure",
            "      template:",
            "        spec:",
            "          containers:",
            "            - name: tensorflow",
            f"              image: {json.dumps(image)}",
            f"              command: {command}",
            "              ports:",
            "                - name: tfjob-port",
            f"                  containerPort: {GRPC_PORT}",
            "                - name: tftrain-ring",
            f"                  containerPort: {RING_PORT}",
            "              resources:",
            "                requests:",
            f"                  cpu: {json.dumps(cpu)}",
            f"                  memory: {json.dumps(memory)}",
            "                limits:",
            f"                  memory: {json.dumps(memory)}",
            "              env:",
            "                - name: GRPC_FAIL_FAST",
            '                  value: "use_caller"',
        ]
    return "\n".join(lines) + "\n"

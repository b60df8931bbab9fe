"""``tftrain launch --emit=tfjob``: the same cluster as a Kubeflow TFJob.

The manifest (``kubeflow.org/v1``, for training-operator 1.x: Kubeflow's
Trainer v2 has no TensorFlow runtime) runs the image built from the
repository's ``Dockerfile``. Each replica declares the ports tftrain opens:
TensorFlow's gRPC server (2222, the operator's default, which it also puts
in TF_CONFIG) and, for multi-worker runs on the CPU, tftrain's gradient
ring (``RING_PORT``).

It runs unattended: the restart policy is ``ExitCode``, under which the
operator retries a replica that exited with 128 or more and fails the job
on 1-127. tftrain's exit codes are chosen to fit (``errors.EXIT_RETRY``):
bad input (2) and a failed run (1) are never retried, a lost task (200), a
preemption's SIGTERM (143) or a kill (137) are, up to ``backoffLimit``
restarts of the job.
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
DEFAULT_BACKOFF_LIMIT = 3
DEFAULT_TTL_SECS = 7 * 24 * 3600  # the finished job's pods and logs stay a week
CLEAN_POD_POLICIES = ("Running", "All", "None")
# The image's user (Dockerfile): pods run as it, and fsGroup makes the
# volumes it mounts writable for it.
IMAGE_UID = 1000
# Pod names are "<job>-<role>-<index>": DNS labels of at most 63 characters.
MAX_JOB_NAME = 48
# The operator's webhook takes DNS-1035 labels: a letter first.
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def parse_volume(spec: str) -> tuple[str, str, str]:
    """``NAME:CLAIM:MOUNT`` -> (name, claim, mount): a PersistentVolumeClaim
    mounted at MOUNT in every replica. Raises ConfigError."""
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(
            f"--volume={spec!r}: expected NAME:CLAIM:MOUNT, e.g. "
            "--volume=runs:my-claim:/mnt/runs (a PersistentVolumeClaim every pod mounts)."
        )
    name, claim, mount = parts
    for what, value in (("name", name), ("claim", claim)):
        if not re.match(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?$", value) or len(value) > 63:
            raise ConfigError(
                f"--volume={spec!r}: the {what} {value!r} is not a Kubernetes name "
                "(lower-case letters, digits and '-', at most 63)."
            )
    if not mount.startswith("/"):
        raise ConfigError(f"--volume={spec!r}: the mount path {mount!r} must be absolute.")
    return name, claim, os.path.normpath(mount)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_for_kubernetes(
    config,
    job_name: str,
    cpu: str = DEFAULT_CPU,
    memory: str = DEFAULT_MEMORY,
    volumes: list[str] | tuple = (),
    gpus: int = 0,
    image: str = "",
) -> list[tuple[str, str, str]]:
    """What a local run would accept but a pod would not: raises ConfigError.
    Returns the parsed volumes."""
    if not _DNS_1035.match(job_name) or len(job_name) > MAX_JOB_NAME:
        raise ConfigError(
            f"--job_name={job_name!r}: the TFJob operator needs a DNS-1035 label: "
            "lower-case letters, digits and '-', starting with a letter and ending with "
            f"a letter or digit, at most {MAX_JOB_NAME} characters (pod names add the role "
            "and index)."
        )
    mounts = [parse_volume(v) for v in volumes]
    names = [m[0] for m in mounts]
    if len(set(names)) != len(names):
        raise ConfigError(f"--volume: two volumes are named the same ({', '.join(names)}).")
    if "://" not in config.model_dir:
        if not os.path.isabs(config.model_dir):
            raise ConfigError(
                f"--model_dir={config.model_dir} is relative: every pod needs the same "
                "absolute path on a volume they share (--volume=NAME:CLAIM:/mnt/runs with "
                "--model_dir=/mnt/runs/NAME), or a URL (gs://...)."
            )
        if not any(_inside(config.model_dir, m[2]) for m in mounts):
            raise ConfigError(
                f"--model_dir={config.model_dir} is on no --volume: each pod would write "
                "its own disk, lost when it restarts. Mount a shared claim above it "
                "(--volume=runs:CLAIM:/mnt/runs with --model_dir=/mnt/runs/...), or give a "
                "bucket (gs://...)."
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
        if float(_QUANTITY.match(value).group(0).rstrip("mKiMGTk") or 0) == 0:
            # A request of nothing is a pod the scheduler places anywhere,
            # and a memory limit of nothing one the kernel kills at once.
            raise ConfigError(f"--{name}={value!r}: expected more than zero.")
    if gpus:
        print(
            f"[launch] note: --task_gpus={gpus}: the image must hold TensorFlow with CUDA "
            f"(docker build --build-arg EXTRAS=gpu -t {image or 'IMAGE'} .).",
            file=sys.stderr,
        )
    return mounts


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
    volumes: list[tuple[str, str, str]] | tuple = (),
    gpus: int = 0,
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT,
    ttl_secs: int = DEFAULT_TTL_SECS,
    clean_pod_policy: str = "Running",
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
        "  runPolicy:",
        f"    backoffLimit: {int(backoff_limit)}",
        f"    cleanPodPolicy: {json.dumps(clean_pod_policy)}",
        f"    ttlSecondsAfterFinished: {int(ttl_secs)}",
        "  tfReplicaSpecs:",
    ]
    roles = (
        ([("Chief", 1)] if num_ps else [])
        + [("Worker", num_workers)]
        + ([("PS", num_ps)] if num_ps else [])
        + ([("Evaluator", 1)] if evaluator else [])
    )
    for role, replicas in roles:
        # Parameter servers and the evaluator compute no gradients: only
        # the trainers ask for GPUs.
        role_gpus = gpus if role in ("Chief", "Worker") else 0
        lines += [
            f"    {role}:",
            f"      replicas: {replicas}",
            "      restartPolicy: ExitCode",
            "      template:",
            "        spec:",
            "          securityContext:",
            f"            runAsUser: {IMAGE_UID}",
            f"            runAsGroup: {IMAGE_UID}",
            f"            fsGroup: {IMAGE_UID}",
            "            runAsNonRoot: true",
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
        ]
        if role_gpus:
            lines.append(f'                  nvidia.com/gpu: "{int(role_gpus)}"')
        lines += [
            "              env:",
            "                - name: GRPC_FAIL_FAST",
            '                  value: "use_caller"',
        ]
        if volumes:
            lines.append("              volumeMounts:")
            for name, _, mount in volumes:
                lines += [
                    f"                - name: {json.dumps(name)}",
                    f"                  mountPath: {json.dumps(mount)}",
                ]
            lines.append("          volumes:")
            for name, claim, _ in volumes:
                lines += [
                    f"            - name: {json.dumps(name)}",
                    "              persistentVolumeClaim:",
                    f"                claimName: {json.dumps(claim)}",
                ]
    return "\n".join(lines) + "\n"

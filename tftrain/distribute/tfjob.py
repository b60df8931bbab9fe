"""``tftrain launch --emit=tfjob``: the same cluster as a Kubeflow TFJob."""

from __future__ import annotations

import json

from tftrain.resources import cluster_inter_op_threads


def tfjob_manifest(
    *, job_name: str, image: str, num_workers: int, num_ps: int, train_argv: list[str]
) -> str:
    """A Kubeflow TFJob whose operator sets TF_CONFIG for every replica.

    JSON-quoted strings keep it valid YAML whatever the flags hold.
    """
    command = json.dumps(
        [
            "tftrain",
            "train",
            f"--inter_op_threads={cluster_inter_op_threads(num_workers)}",
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
            "              env:",
            "                - name: GRPC_FAIL_FAST",
            '                  value: "use_caller"',
        ]
    return "\n".join(lines) + "\n"

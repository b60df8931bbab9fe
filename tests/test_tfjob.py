"""``tftrain launch --emit=tfjob``: every manifest it writes is a TFJob that
Kubeflow's training-operator 1.9.0 accepts (its CRD's schema and its
webhook's rules), and every pod's TF_CONFIG, written as the operator writes
it, is one tftrain runs under."""

import itertools
import json
import os
import re

import pytest
import yaml

from tests.conftest import ROOT, run_tftrain
from tftrain.distribute import launch, tfjob

# The CRD's openAPIV3Schema (tests/data: its source is named inside).
SCHEMA = json.load(open(os.path.join(ROOT, "tests", "data", "tfjob_crd_v1.9.0.json")))["schema"]
# What the operator's Go types and webhook (pkg/apis/kubeflow.org/v1,
# pkg/webhooks/tensorflow, release 1.9.0) add to the schema.
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
CLEAN_POD_POLICIES = {"All", "Running", "None"}
REPLICA_TYPES = {"Chief", "Master", "Worker", "PS", "Evaluator"}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?$")


def schema_errors(value, schema, path="") -> list[str]:
    """Where ``value`` breaks ``schema`` (the structural subset of OpenAPI v3
    that a CRD uses, with unknown fields refused as kubectl's strict
    validation does)."""
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected an int or a string, got {value!r}"]
    kind = schema.get("type")
    expected = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "boolean": bool,
        "number": (int, float),
    }.get(kind)
    if expected is None:
        return []
    if not isinstance(value, expected) or (kind == "integer" and isinstance(value, bool)):
        return [f"{path}: expected {kind}, got {value!r}"]
    errors = []
    if kind == "object":
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{path}.{name}: required")
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{path}.{key}")
            elif properties is not None:
                errors.append(f"{path}.{key}: not a field of the schema")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def operator_errors(job) -> list[str]:
    """The operator's own checks: its webhook's and its enums'."""
    errors = []
    if not DNS_1035.match(job["metadata"]["name"]):
        errors.append("metadata.name is not a DNS-1035 label")
    policy = job["spec"].get("runPolicy", {}).get("cleanPodPolicy")
    if policy is not None and policy not in CLEAN_POD_POLICIES:
        errors.append(f"cleanPodPolicy {policy!r}")
    replicas = job["spec"]["tfReplicaSpecs"]
    if sum(role in ("Chief", "Master") for role in replicas) > 1:
        errors.append("more than one Chief or Master")
    for role, spec in replicas.items():
        if role not in REPLICA_TYPES:
            errors.append(f"replica type {role!r}")
        if spec.get("restartPolicy", "Always") not in RESTART_POLICIES:
            errors.append(f"{role}: restartPolicy {spec['restartPolicy']!r}")
        containers = spec["template"]["spec"]["containers"]
        if not any(c["name"] == "tensorflow" for c in containers):
            errors.append(f"{role}: no container named tensorflow")
        if not all(c.get("image") for c in containers):
            errors.append(f"{role}: a container without an image")
    return errors


def operator_tf_configs(job):
    """TF_CONFIG of every pod, as the operator writes it (genTFConfigJSONStr:
    every replica, the evaluator too, at <job>-<type>-<i>.<namespace>.svc)."""
    name = job["metadata"]["name"]
    replicas = job["spec"]["tfReplicaSpecs"]
    cluster = {
        role.lower(): [
            f"{name}-{role.lower()}-{i}.default.svc:{tfjob.GRPC_PORT}"
            for i in range(spec["replicas"])
        ]
        for role, spec in replicas.items()
    }
    for role, spec in replicas.items():
        for i in range(spec["replicas"]):
            document = {
                "cluster": cluster,
                "task": {"type": role.lower(), "index": i},
                "environment": "cloud",
            }
            yield role, json.dumps(document)


STRATEGIES = {
    "multi_worker_mirrored": {"num_ps": 0},
    "parameter_server": {"num_ps": 2},
    "model_parallel": {"num_ps": 0},
}


@pytest.mark.parametrize(
    "strategy, volumes, gpus, evaluator",
    [
        (s, v, g, e)
        for s, v, g, e in itertools.product(
            STRATEGIES, [(), [("runs", "claim-1", "/mnt/runs")]], [0, 2], [False, True]
        )
        if not (e and s != "parameter_server")
    ],
)
def test_every_manifest_is_a_tfjob_the_operator_accepts(strategy, volumes, gpus, evaluator):
    from tftrain.distribute import base
    from tftrain.distribute import cluster as cluster_lib

    model_dir = "/mnt/runs/a" if volumes else "gs://bucket/a"
    train_argv = [
        "--experiment=fashion_mnist_mlp",
        f"--strategy={strategy}",
        f"--model_dir={model_dir}",
    ]
    if strategy == "model_parallel":
        train_argv.append("--num_stages=2")
    num_workers = 2  # two stages, for model_parallel
    text = tfjob.tfjob_manifest(
        job_name="fmnist-a1",
        image="registry.example/tftrain:1",
        num_workers=num_workers,
        num_ps=STRATEGIES[strategy]["num_ps"],
        train_argv=train_argv,
        evaluator=evaluator,
        volumes=volumes,
        gpus=gpus,
    )
    job = yaml.safe_load(text)
    assert schema_errors(job, SCHEMA) == []
    assert operator_errors(job) == []
    assert job["spec"]["runPolicy"] == {
        "backoffLimit": tfjob.DEFAULT_BACKOFF_LIMIT,
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": tfjob.DEFAULT_TTL_SECS,
    }
    for role, spec in job["spec"]["tfReplicaSpecs"].items():
        assert spec["restartPolicy"] == "ExitCode"
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        trains = role in ("Chief", "Worker")
        assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus and trains else None)
        mounts = container.get("volumeMounts", [])
        assert [(m["name"], m["mountPath"]) for m in mounts] == [(v[0], v[2]) for v in volumes]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])]
        assert claims == [v[1] for v in volumes]
    # Each pod's TF_CONFIG, as the operator writes it, is a cluster the
    # training flags run on.
    command = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    tf_configs = list(operator_tf_configs(job))
    spec = json.loads(tf_configs[0][1])["cluster"]
    config = launch.check_train_argv(command["command"][2:], spec)
    roles = set()
    for _, tf_config in tf_configs:
        cluster = cluster_lib.parse_tf_config(tf_config)
        roles.add(cluster.task_type)
        if cluster.task_type not in ("evaluator", "ps"):
            base.mode_for(config, cluster)
    assert roles == {r.lower() for r in job["spec"]["tfReplicaSpecs"]}


def test_the_schema_check_can_fail():
    job = yaml.safe_load(
        tfjob.tfjob_manifest(
            job_name="a", image="i", num_workers=2, num_ps=0, train_argv=["--model_dir=gs://b/r"]
        )
    )
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    worker["replicas"] = "2"
    worker["template"]["spec"]["containers"][0]["volumeMount"] = []
    job["spec"]["runPolicy"]["backoffLimit"] = True
    assert schema_errors(job, SCHEMA) == [
        ".spec.runPolicy.backoffLimit: expected integer, got True",
        ".spec.tfReplicaSpecs.Worker.replicas: expected integer, got '2'",
        ".spec.tfReplicaSpecs.Worker.template.spec.containers[0].volumeMount: "
        "not a field of the schema",
    ]
    job["metadata"]["name"] = "1run"
    worker["restartPolicy"] = "Sometimes"
    assert operator_errors(job) == [
        "metadata.name is not a DNS-1035 label",
        "Worker: restartPolicy 'Sometimes'",
    ]


def test_the_launch_command_emits_volumes_gpus_and_policies():
    result = run_tftrain(
        "launch",
        "--num_workers=2",
        "--emit=tfjob",
        "--volume=runs:team-claim:/mnt/runs",
        "--volume=data:datasets:/data",
        "--task_gpus=1",
        "--backoff_limit=5",
        "--ttl_secs=60",
        "--clean_pod_policy=All",
        "--",
        "--strategy=multi_worker_mirrored",
        "--model_dir=/mnt/runs/x",
    )
    job = yaml.safe_load(result.stdout)
    assert schema_errors(job, SCHEMA) == [] and operator_errors(job) == []
    assert job["spec"]["runPolicy"] == {
        "backoffLimit": 5,
        "cleanPodPolicy": "All",
        "ttlSecondsAfterFinished": 60,
    }
    pod = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]] == [
        "team-claim",
        "datasets",
    ]
    assert "--build-arg EXTRAS=gpu" in result.stderr  # the image must hold CUDA


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--job_name=1run"], "DNS-1035 label"),
        (["--volume=runs:claim"], "expected NAME:CLAIM:MOUNT"),
        (["--volume=Runs:claim:/mnt"], "not a Kubernetes name"),
        (["--volume=runs:claim:mnt"], "must be absolute"),
        (["--volume=runs:claim:/elsewhere"], "--model_dir=/mnt/runs/x is on no --volume"),
        (["--volume=a:c:/mnt/runs", "--volume=a:d:/data"], "named the same"),
    ],
)
def test_what_the_operator_or_a_pod_would_refuse_is_refused(flags, said):
    result = run_tftrain(
        "launch",
        "--num_workers=2",
        "--emit=tfjob",
        *flags,
        "--",
        "--strategy=multi_worker_mirrored",
        "--model_dir=/mnt/runs/x",
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and said in result.stderr


def test_exit_codes_fit_the_exit_code_restart_policy():
    """The operator retries 128 and up and gives up on 1-127: bad input and
    a failed run are final, a lost task and a signal are retried."""
    from tftrain import errors

    assert errors.RunError.exit_code == 2 and errors.DivergedError.exit_code == 1
    assert errors.LostTaskError.exit_code == errors.EXIT_RETRY >= 128
    assert errors.EXIT_RETRY > 128 + 64  # no signal's code

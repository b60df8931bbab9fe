import json

import pytest

from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute import cluster
from tftrain.distribute.base import mode_for

TWO = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}


def tf_config(cluster_spec=TWO, task_type="worker", index=0):
    return json.dumps({"cluster": cluster_spec, "task": {"type": task_type, "index": index}})


def test_worker_zero_is_chief_without_a_chief_task():
    info = cluster.parse_tf_config(tf_config())
    assert info.is_chief and info.num_workers == 2 and info.address == "127.0.0.1:2222"
    assert not cluster.parse_tf_config(tf_config(index=1)).is_chief


def test_chief_task_is_chief():
    spec = {"chief": ["localhost:1"], "worker": ["localhost:2"], "ps": ["localhost:3"]}
    assert cluster.parse_tf_config(tf_config(spec, "chief", 0)).is_chief
    assert not cluster.parse_tf_config(tf_config(spec, "worker", 0)).is_chief


def test_unset_is_a_single_process_run():
    assert cluster.parse_tf_config(None) is None
    assert cluster.parse_tf_config("  ") is None


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ("[1, 2]", "TF_CONFIG is a JSON list"),
        (json.dumps({"task": {"type": "worker", "index": 0}}), "TF_CONFIG has no 'cluster'"),
        (tf_config({"master": ["h:1"]}), "task type 'master'"),
        (tf_config({"worker": []}), "expected a non-empty list"),
        (
            tf_config({"worker": ["nohostport"]}),
            "cluster['worker'][0] is 'nohostport': expected host:port",
        ),
        (tf_config({"worker": ["h:99999"]}), "port 99999 is outside 1-65535"),
        (
            tf_config({"worker": ["h:1", "h:1"]}),
            "the same address as TF_CONFIG cluster['worker'][0]",
        ),
        (tf_config({"worker": ["h:1"], "chief": ["h:2", "h:3"]}), "2 chiefs"),
        (json.dumps({"cluster": TWO}), "TF_CONFIG has no 'task'"),
        (tf_config(task_type="ps"), "task type 'ps' is not in the cluster"),
        (tf_config(index=2), "task index 2 is out of range: cluster has 2 worker task(s)"),
        (tf_config(index=-1), "task index -1: expected an integer >= 0"),
        (tf_config(index="0"), "task index '0'"),
    ],
)
def test_malformed_tf_config_gets_one_clear_message(raw, message):
    with pytest.raises(ConfigError) as e:
        cluster.parse_tf_config(raw)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "spec, task, strategy, message",
    [
        (
            {"worker": ["h:1"], "ps": ["h:2"]},
            ("worker", 0),
            "multi_worker_mirrored",
            "does not use ps tasks",
        ),
        (
            TWO,
            ("worker", 0),
            "mirrored",
            "Slurm sets it), but --strategy=mirrored runs in one process",
        ),
        (TWO, ("worker", 0), "one_device", "--strategy=multi_worker_mirrored"),
    ],
)
def test_strategy_must_fit_the_cluster(spec, task, strategy, message):
    info = cluster.parse_tf_config(tf_config(spec, *task))
    with pytest.raises(ConfigError) as e:
        mode_for(config_for(strategy), info)
    assert message in str(e.value)


def config_for(strategy):
    return ExperimentConfig(strategy=strategy, model_dir="/unused").validate()


def test_fitting_clusters_pass():
    mode_for(config_for("multi_worker_mirrored"), cluster.parse_tf_config(tf_config()))
    mode_for(config_for("one_device"), None)
    single = cluster.parse_tf_config(tf_config({"worker": ["h:1"]}))
    mode_for(config_for("one_device"), single)


def test_the_tasks_of_a_cluster_reach_each_other_around_a_proxy():
    info = cluster.parse_tf_config(
        json.dumps({"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
                    "task": {"type": "worker", "index": 0}})
    )  # fmt: skip
    environ = {}
    cluster.keep_off_proxies(info, environ)
    assert environ == {}  # no proxy: nothing to go around
    environ = {"https_proxy": "http://proxy:3128", "no_proxy": "internal.example"}
    cluster.keep_off_proxies(info, environ)
    assert environ["no_grpc_proxy"] == "internal.example,10.0.0.1,10.0.0.2"
    cluster.keep_off_proxies(info, environ)  # again: no host twice
    assert environ["no_grpc_proxy"] == "internal.example,10.0.0.1,10.0.0.2"

import re

import pytest

from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute.base import mode_for


def valid(**changes):
    return ExperimentConfig(model_dir="/tmp/x").replace(**changes)


def test_defaults_validate():
    assert valid().validate().model == "softmax"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"learning_rate": -0.1}, "--learning_rate=-0.1: expected a number > 0"),
        ({"learning_rate": float("nan")}, "--learning_rate=nan"),
        ({"model": "resnet"}, "--model=resnet: expected one of softmax, mlp, cnn"),
        ({"optimizer": "rmsprop"}, "--optimizer=rmsprop: expected one of sgd"),
        ({"strategy": "horovod"}, "--strategy=horovod: expected one of"),
        ({"batch_size": 0}, "--batch_size=0: expected a positive integer"),
        ({"epochs": -1}, "--epochs=-1"),
        ({"train_steps": 0}, "--train_steps=0"),
        (
            {"strategy": "mirrored", "num_replicas": 3, "batch_size": 100},
            "--batch_size=100 does not split evenly over 3 replicas",
        ),
        ({"num_replicas": 2}, "--num_replicas=2 applies to --strategy=mirrored only"),
        ({"optimizer": "momentum", "momentum": 1.5}, "--momentum=1.5"),
        ({"model": "mlp", "hidden_units": ()}, "--hidden_units="),
        ({"strategy": "no_such_mode"}, "--strategy=no_such_mode: expected one of"),
        ({"hidden_units": (64,)}, "--hidden_units applies to --model=mlp"),
        ({"optimizer": "adam", "momentum": 0.9}, "--momentum applies to --optimizer=sgd"),
        ({"optimizer": "adam", "nesterov": True}, "--nesterov applies to --optimizer=momentum"),
        ({"seed": -1}, "--seed=-1: expected an integer in 0-4294967295"),
        ({"seed": 2**32}, "--seed=4294967296"),
        ({"log_interval_secs": -1.0}, "--log_interval_secs=-1.0"),
        ({"log_interval_secs": float("nan")}, "--log_interval_secs=nan"),
        ({"warmup_epochs": 1e9}, "--warmup_epochs=1000000000.0 is longer than the run"),
        ({"inter_op_threads": 100000}, "--inter_op_threads=100000: expected 0"),
        ({"num_microbatches": 0}, "--num_microbatches=0"),
        ({"batch_size": 100, "num_microbatches": 8}, "does not split into 8 micro-batches"),
        ({"collective": "ring"}, "--collective=ring: expected one of auto, tcp, grpc, nccl"),
        ({"all_reduce": "ring"}, "--all_reduce=ring"),
        ({"model_dir": None}, "--model_dir is required"),
        ({"lr_schedule": "exp"}, "--lr_schedule=exp"),
    ],
)
def test_bad_values_name_the_flag_and_what_is_expected(changes, message):
    with pytest.raises(ConfigError) as e:
        config = valid(**changes).validate()
        mode_for(config)  # the strategy's own checks
    assert message in str(e.value)


def test_tfds_names_are_open_ended():
    assert valid(dataset="imagenette").validate().dataset == "imagenette"


def test_collective_pack_bytes_must_not_be_negative():
    with pytest.raises(ConfigError, match="--collective_pack_bytes=-1"):
        valid(collective_pack_bytes=-1).validate()
    assert valid(collective_pack_bytes=0).validate().collective_pack_bytes == 0


def test_every_flag_has_its_help_beside_its_field():
    import dataclasses

    from tftrain import flagset
    from tftrain.config import ExperimentConfig, field_help

    flags_ = [f for f in dataclasses.fields(ExperimentConfig) if f.metadata.get("flag", True)]
    missing = [f.name for f in flags_ if not f.metadata.get("help")]
    assert not missing, f"fields without help beside them: {missing}"
    helps = flagset._help()
    assert set(helps) == {f.name for f in flags_}
    # The choices come from the registries as they are now.
    assert "model_parallel" in field_help(
        next(f for f in flags_ if f.name == "strategy")
    ) and "{" not in "".join(helps.values())


@pytest.mark.parametrize(
    "changes, said",
    [
        (
            {"learning_rate": "0.01"},
            "learning_rate='0.01' (str): the field learning_rate takes a number",
        ),
        ({"profile_steps": "30,40"}, "takes a list"),
        ({"batch_size": True}, "batch_size takes a whole number"),
        ({"embed_dim": "16"}, "the experiment's option embed_dim takes a whole number"),
        ({"train_step": 10}, "did you mean 'train_steps'"),
    ],
)
def test_values_from_python_are_checked_as_the_flags_would_be(changes, said):
    config = ExperimentConfig(model_dir="/x", options={"embed_dim": 16})
    with pytest.raises(ConfigError, match=re.escape(said)):
        config.replace(**changes).validate()


def test_a_path_is_taken_for_a_folder():
    import pathlib

    config = ExperimentConfig(model_dir=pathlib.Path("/tmp/run")).validate()
    assert config.model_dir == "/tmp/run" and config.replace(learning_rate=1).validate()


def test_the_built_in_tasks_fields_are_refused_for_a_task_of_ones_own():
    import tftrain

    class Mine(tftrain.Task):
        pass

    base = ExperimentConfig(task=Mine, model_dir="/tmp/x")
    base.validate()
    for field, value in (("model", "cnn"), ("dataset", "mnist"), ("hidden_units", (8,))):
        with pytest.raises(ConfigError, match=rf"--{field} applies to the built-in task only"):
            base.replace(**{field: value}).validate()

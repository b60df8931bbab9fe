import pytest

from tftrain.config import ConfigError, ExperimentConfig


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
        ({"momentum": 1.5}, "--momentum=1.5"),
        ({"hidden_units": ()}, "--hidden_units="),
        ({"strategy": "parameter_server"}, "not available in this version"),
        ({"model_dir": None}, "--model_dir is required"),
        ({"lr_schedule": "exp"}, "--lr_schedule=exp"),
    ],
)
def test_bad_values_name_the_flag_and_what_is_expected(changes, message):
    with pytest.raises(ConfigError) as e:
        valid(**changes).validate()
    assert message in str(e.value)


def test_tfds_names_are_open_ended():
    assert valid(dataset="imagenette").validate().dataset == "imagenette"


def test_collective_pack_bytes_must_not_be_negative():
    with pytest.raises(ConfigError, match="--collective_pack_bytes=-1"):
        valid(collective_pack_bytes=-1).validate()
    assert valid(collective_pack_bytes=0).validate().collective_pack_bytes == 0

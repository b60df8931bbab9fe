"""A new parallel mode, model or task is a module plus a registration: these
tests add each from inside the test and train through tftrain's own loop."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tftrain import controller, plugins
from tftrain.config import ExperimentConfig
from tftrain.distribute.base import ParallelMode, Placement, mode_for


class DeferredOneDevice(ParallelMode):
    """A stand-in for an asynchronous mode: loops are queued when dispatched
    and run only when the controller syncs, as a coordinator's would."""

    name = "deferred_for_test"
    loops_between_syncs = 3

    def __init__(self, config, cluster=None):
        super().__init__(config, cluster)
        self.queue, self.sizes, self.syncs = [], [], 0

    def create(self):
        return Placement(tf.distribute.OneDeviceStrategy("/cpu:0"))

    def run_steps(self, trainer, iterator, loops):
        for num_steps in loops:
            self.sizes.append(num_steps)
            self.queue.append(lambda n=num_steps: trainer.train(iterator, n))
        self.syncs += 1
        while self.queue:
            self.queue.pop(0)()


@pytest.fixture
def deferred_mode():
    plugins.STRATEGIES.register(DeferredOneDevice.name, DeferredOneDevice)
    yield
    plugins.STRATEGIES.unregister(DeferredOneDevice.name)


def config(tmp_path, name, **changes):
    return ExperimentConfig(
        dataset="synthetic",
        model="mlp",
        hidden_units=(32,),
        batch_size=50,
        train_steps=40,
        steps_per_loop=5,
        eval_interval=20,
        checkpoint_interval=20,
        export=False,
        model_dir=str(tmp_path / name),
        **changes,
    ).validate()


def test_a_mode_defined_here_trains_through_the_seam(tmp_path, deferred_mode):
    mode = mode_for(config(tmp_path, "deferred", strategy=DeferredOneDevice.name))
    mode.setup()
    result = controller.run(mode.config, mode, log=lambda line: None)
    assert result["global_step"] == 40 and sum(mode.sizes) == 40
    # Up to three loops of 5 between syncs, ending at each evaluation/checkpoint.
    assert mode.sizes == [5] * 8 and mode.syncs == 4
    one = mode_for(config(tmp_path, "one"))
    one.setup()
    expected = controller.run(one.config, one, log=lambda line: None)
    assert result["weights_sha256"] == expected["weights_sha256"]
    assert result["eval_loss"] == expected["eval_loss"]
    assert os.path.exists(tmp_path / "deferred" / "checkpoints" / "checkpoint")


def test_the_mode_name_is_offered_only_while_registered(tmp_path, deferred_mode):
    from tftrain import cli

    assert DeferredOneDevice.name in cli._help()["strategy"]
    plugins.STRATEGIES.unregister(DeferredOneDevice.name)
    assert DeferredOneDevice.name not in cli._help()["strategy"]


def test_an_embedding_model_over_token_ids_fits_the_loop(tmp_path):
    cfg = ExperimentConfig(
        dataset="synthetic_tokens",
        model="embedding_bag",
        optimizer="adam",
        learning_rate=0.01,
        batch_size=64,
        epochs=3,
        steps_per_loop=20,
        model_dir=str(tmp_path / "tokens"),
    ).validate()
    mode = mode_for(cfg)
    mode.setup()
    result = controller.run(cfg, mode, log=lambda line: None)
    assert result["eval_accuracy"] > 0.6  # 4 classes: chance is 0.25
    served = tf.saved_model.load(str(tmp_path / "tokens" / "export"))
    signature = served.signatures["serving_default"]
    spec = signature.structured_input_signature[1]["tokens"]
    assert spec.dtype == tf.int32
    logits = next(iter(signature(tokens=tf.zeros([2, 16], tf.int32)).values()))
    assert logits.shape == (2, 4) and np.isfinite(logits.numpy()).all()
    saved = json.loads((tmp_path / "tokens" / "config.json").read_text())
    assert saved["model"] == "embedding_bag"

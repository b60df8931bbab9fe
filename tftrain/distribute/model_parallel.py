"""``--strategy=model_parallel``: the model's layers as a pipeline of stages.

``--num_stages=K`` cuts the model into K runs of consecutive layers
(:mod:`tftrain.pipeline`), balanced by measured time (or parameter count),
each with its variables and its ops on its own device:

- in one process: GPU k where there are K GPUs, else logical CPU device k;
- in a cluster (``TF_CONFIG``, as ``tftrain launch --num_workers=K`` sets
  up): the first task (the chief, else worker 0) drives the run and holds
  stage 0; the other tasks serve their stages until it is done.

Each step cuts the batch into ``--num_microbatches=M`` micro-batches that
flow through the stages in the order of ``--pipeline_schedule``, and applies
the summed gradients once: the same update as the whole model on the whole
batch.
"""

from __future__ import annotations

from tftrain import resources
from tftrain.distribute import serving
from tftrain.distribute.base import ParallelMode, Placement
from tftrain.errors import ConfigError


class ModelParallel(ParallelMode):
    name = "model_parallel"
    serving_roles = frozenset({"chief", "worker"})  # all but the driver: see serves()

    def __init__(self, config, cluster=None):
        super().__init__(config, cluster)
        self.stages, self.trainer, self.balance = [], None, ""

    @classmethod
    def check(cls, config, cluster) -> None:
        super().check(config, None)
        if cluster is None:
            return
        if set(cluster.cluster) - {"chief", "worker"}:
            extra = ", ".join(sorted(set(cluster.cluster) - {"chief", "worker"}))
            raise ConfigError(
                f"--strategy=model_parallel runs on chief and worker tasks; TF_CONFIG's "
                f"cluster also has {extra}."
            )
        tasks = len(cluster.training_tasks())
        if tasks != config.stages:
            raise ConfigError(
                f"--num_stages={config.stages} needs one task per stage, but TF_CONFIG's "
                f"cluster has {tasks}: expected {config.stages} "
                f"(tftrain launch --num_workers={config.stages})."
            )

    def _driver(self):
        return self.cluster.training_tasks()[0]

    def serves(self, cluster) -> bool:
        return (cluster.task_type, cluster.task_index) != self._driver()

    def serve(self) -> int:
        return serving.serve(
            self.cluster,
            self.config.collective_timeout_secs,
            self.default_threads()[1],
            config=self.config,
        )

    def default_threads(self) -> tuple[int, int]:
        if self.cluster is None:
            return 0, 0
        return 0, resources.cluster_inter_op_threads(self.config.stages)

    def watchdog(self):
        if self.cluster is None:
            return super().watchdog()
        from tftrain.distribute.watchdog import Watchdog

        watchdog = Watchdog(self.config.collective_timeout_secs, self.cluster)
        watchdog.kick("connecting to the tasks that hold the pipeline's stages")
        return watchdog

    # -- placement ---------------------------------------------------------

    def create(self) -> Placement:
        import tensorflow as tf

        self.devices = self._devices()
        processes = len(self.cluster.training_tasks()) if self.cluster else 1
        return Placement(tf.distribute.get_strategy(), True, processes, 0)

    def _devices(self) -> list[str]:
        import tensorflow as tf

        K = self.config.stages
        if self.cluster is None:
            gpus = len(tf.config.list_physical_devices("GPU"))
            if 0 < gpus < K:
                raise ConfigError(
                    f"--num_stages={K} is more stages than this machine's {gpus} GPU(s): "
                    f"expected at most {gpus}."
                )
            return resources.local_devices(K, "--num_stages")
        # A ClusterSpec and this task's name, not a cluster resolver: measured
        # here, connecting through TFConfigClusterResolver never returns.
        spec = tf.train.ClusterSpec({k: list(v) for k, v in self.cluster.cluster.items()})
        tf.config.experimental_connect_to_cluster(
            spec,
            job_name=self.cluster.task_type,
            task_index=self.cluster.task_index,
            protocol="grpc",
        )
        devices = []
        for task_type, index in self.cluster.training_tasks():
            prefix = f"/job:{task_type}/replica:0/task:{index}/device:"
            have = {d.name for d in tf.config.list_logical_devices()}
            devices.append(prefix + ("GPU:0" if prefix + "GPU:0" in have else "CPU:0"))
        return devices

    def place_model(self, model):
        from tftrain import pipeline

        config = self.config
        layers = pipeline.segments(model)
        K = config.stages
        if K > len(layers):
            raise ConfigError(
                f"--num_stages={K}: {model.name} can be cut into at most {len(layers)} "
                f"piece(s) ({', '.join(la.name for la in layers)}): a cut needs a point "
                "where a single tensor crosses between the layers before and after it. "
                f"Expected --num_stages of at most {len(layers)}."
            )
        micro_batch = config.batch_size // config.microbatches
        self.balance, costs = pipeline.layer_costs(
            layers,
            model.inputs[0].shape[1:],
            model.inputs[0].dtype,
            micro_batch,
            config.pipeline_balance or "time",
        )
        bounds = pipeline.partition(costs, K, holds=[bool(la.weights) for la in layers])
        placed, self.stages = pipeline.place(model, self.devices, bounds, costs)
        return placed

    def make_trainer(self, **kwargs):
        from tftrain.pipeline import PipelineTrainer

        self.trainer = PipelineTrainer(
            stages=self.stages, pipeline_schedule=self.config.pipeline_schedule or "gpipe", **kwargs
        )
        return self.trainer

    # -- reports -----------------------------------------------------------

    def announce(self) -> list[str]:
        from tftrain import pipeline

        unit = "ms" if self.balance == "time" else "params"
        scale = 1000.0 if self.balance == "time" else 1.0
        lines = [
            f"Pipeline of {len(self.stages)} stages, {self.config.microbatches} micro-batch(es) "
            f"per step, {self.config.pipeline_schedule or 'gpipe'} schedule; predicted bubble "
            f"{pipeline.bubble_fraction(len(self.stages), self.config.microbatches):.0%}; "
            f"balanced by {self.balance}:"
        ]
        for stage in self.stages:
            lines.append(
                f"  stage {stage.index} on {stage.device}: {', '.join(stage.layer_names)} "
                f"({stage.cost * scale:,.3g} {unit})"
            )
        return lines

    def describe(self) -> dict:
        from tftrain import pipeline

        peaks = self.trainer.peak_activation_values() if self.trainer else []
        return {
            "num_stages": len(self.stages),
            "num_microbatches": self.config.microbatches,
            "pipeline_schedule": self.config.pipeline_schedule or "gpipe",
            "pipeline_balance": self.balance,
            "pipeline_bubble_fraction": pipeline.bubble_fraction(
                len(self.stages), self.config.microbatches
            ),
            "pipeline_stages": [
                {
                    "device": s.device,
                    "layers": s.layer_names,
                    "cost": s.cost,
                    "peak_activation_bytes": 4 * peak,
                }
                for s, peak in zip(self.stages, peaks)
            ],
        }

"""A cluster from Slurm: ``srun tftrain train ...`` (or ``srun`` inside an
``sbatch`` script) starts one task per Slurm task, and each takes its role
from Slurm's environment through TensorFlow's ``SlurmClusterResolver``.

The tasks of the step, in Slurm's rank order (``SLURM_PROCID``), are: for
``multi_worker_mirrored`` and ``model_parallel``, workers 0..N-1; for
``parameter_server``, the chief (rank 0), then ``--slurm_ps`` parameter
servers, then the workers (the resolver assigns the task types in sorted
order). Task I on a node listens on ``--slurm_port_base`` + its place on
the node. The cluster is written into ``TF_CONFIG``, so that the run goes
on exactly as under a TFJob or ``tftrain launch``.

GPUs: Slurm binds them (``--gpus-per-task``, which sets each task's
``CUDA_VISIBLE_DEVICES``); the resolver is told not to.
"""

from __future__ import annotations

import json
import os

from tftrain.errors import ConfigError

# Ports of a job's tasks on one node, when --slurm_port_base is 0: from the
# job id, so that two jobs sharing a node rarely meet (40 ports each).
PORT_RANGE = (20000, 60000)
PORTS_PER_JOB = 40


def in_step(environ=os.environ) -> bool:
    """Whether this process is one of several tasks of a Slurm job step."""
    # Not SLURM_NTASKS: an sbatch script itself runs as one process with it.
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    return "SLURM_PROCID" in environ and tasks.isdigit() and int(tasks) > 1


def port_base(config, environ=os.environ) -> int:
    if config.slurm_port_base:
        return config.slurm_port_base
    job = environ.get("SLURM_JOB_ID", "0")
    job = int(job) if job.isdigit() else 0
    slots = (PORT_RANGE[1] - PORT_RANGE[0]) // PORTS_PER_JOB
    return PORT_RANGE[0] + (job % slots) * PORTS_PER_JOB


def jobs_for(config, num_tasks: int) -> dict[str, int]:
    """The task types of a step of ``num_tasks`` tasks under ``config.strategy``."""
    strategy = config.strategy
    if strategy in ("multi_worker_mirrored", "model_parallel"):
        if config.slurm_ps:
            raise ConfigError(
                f"--slurm_ps={config.slurm_ps} with --strategy={strategy}: parameter "
                "servers are for --strategy=parameter_server."
            )
        return {"worker": num_tasks}
    if strategy == "parameter_server":
        workers = num_tasks - 1 - config.slurm_ps
        if config.slurm_ps < 1 or workers < 1:
            raise ConfigError(
                f"--strategy=parameter_server under srun with {num_tasks} tasks and "
                f"--slurm_ps={config.slurm_ps}: expected a chief, at least one parameter "
                "server and one worker (--slurm_ps=1 or more, and srun --ntasks at least "
                "--slurm_ps + 2)."
            )
        return {"chief": 1, "ps": config.slurm_ps, "worker": workers}
    raise ConfigError(
        f"srun started {num_tasks} tasks, but --strategy={strategy} runs in one process: "
        "use --strategy=multi_worker_mirrored, parameter_server or model_parallel, or "
        "srun --ntasks=1."
    )


def tf_config(config) -> str:
    """This task's TF_CONFIG, resolved from Slurm's environment (which the
    resolver reads from ``os.environ``)."""
    environ = os.environ
    from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver as slurm

    num_tasks = int(environ["SLURM_STEP_NUM_TASKS"])
    jobs = jobs_for(config, num_tasks)
    try:
        resolver = slurm.SlurmClusterResolver(
            jobs=jobs,
            port_base=port_base(config, environ),
            # GPUs are Slurm's to bind (--gpus-per-task): the resolver only
            # needs a count it will not check against nvidia-smi.
            gpus_per_node=num_tasks,
            gpus_per_task=1,
            auto_set_gpu=False,
        )
        spec = resolver.cluster_spec().as_dict()
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"could not read the cluster from Slurm's environment: {e}") from None
    task_type, task_id = resolver.get_task_info()
    return json.dumps({"cluster": spec, "task": {"type": task_type, "index": task_id}})

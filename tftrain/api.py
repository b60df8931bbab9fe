"""``tftrain.train``: what ``tftrain train`` runs, from Python.

The command line and this function share :func:`prepare` (every check that
needs no TensorFlow) and :func:`execute` (the run, or this task's role in a
cluster). The command line turns the errors into one line and an exit code;
``train`` raises them.
"""

from __future__ import annotations

from tftrain import fileio, resources
from tftrain.config import ConfigError, ExperimentConfig


def prepare(config: ExperimentConfig):
    """``(config, cluster, mode)``, all checked before anything starts.

    Raises:
      ConfigError: for the first thing that is wrong.
    """
    from tftrain.distribute import base
    from tftrain.distribute import cluster as cluster_lib
    from tftrain.tasks import from_config

    config = config.validate()
    fileio.check_scheme(config.model_dir)
    fileio.check_reachable(config.model_dir)
    if config.data_dir:
        fileio.check_scheme(config.data_dir, "--data_dir")
        fileio.check_reachable(config.data_dir, "--data_dir")
    if fileio.exists(config.model_dir) and not fileio.isdir(config.model_dir):
        raise ConfigError(
            f"--model_dir={config.model_dir} is a file: expected a "
            "folder (new or from an earlier run)."
        )
    cluster = cluster_lib.from_environment(config)
    if cluster is not None:
        fileio.check_shared(config.model_dir)
        cluster_lib.keep_off_proxies(cluster)
    if config.restart and cluster is not None:
        raise ConfigError(
            "--restart moves the earlier run's files, which one task of a cluster "
            "cannot do for the others: use tftrain launch ... -- --restart, or move "
            f"{config.model_dir} away yourself."
        )
    mode = base.mode_for(config, cluster)
    check = getattr(from_config(config), "check", None)
    if callable(check):
        from tftrain.tasks import call_user

        call_user(f"{getattr(config.task, '__name__', config.task)}.check", check, config)
    return config, cluster, mode


def execute(config, cluster, mode, *, log=print, stop=None, watchdog_box=None, train_actions=None):
    """Runs this task's part: the training run (returns metrics.json's dict),
    or a role that serves or evaluates (returns its exit code, an int).

    ``watchdog_box``: a list that receives the watchdog, so that the caller
    can stop it whatever happens. ``train_actions``: in place of the default
    ones (controller.run).
    """
    from tftrain import runlock

    lock = runlock.for_task(config.model_dir, cluster, log)
    try:
        return _execute(
            config,
            cluster,
            mode,
            log=log,
            stop=stop,
            watchdog_box=watchdog_box,
            train_actions=train_actions,
        )
    finally:
        lock.release()


def _execute(config, cluster, mode, *, log, stop, watchdog_box, train_actions):
    from tftrain import controller, resources

    if config.restart:
        from tftrain import checkpoints

        aside = checkpoints.set_aside_run(config.model_dir)
        if aside:
            log(f"--restart: moved the earlier run's files to {aside}.")
    intra, inter = mode.default_threads()
    try:
        resources.configure_threads(
            config.intra_op_threads or intra,
            config.inter_op_threads or inter,
            spinning=config.thread_spinning,
        )
    except RuntimeError:  # TensorFlow already started in this process: its pools stay
        if config.intra_op_threads or config.inter_op_threads:
            log(
                "Note: TensorFlow had already started in this process, so "
                "--intra_op_threads/--inter_op_threads could not be applied."
            )
    if cluster is not None and cluster.task_type == "evaluator" and mode.takes_evaluator:
        from tftrain import evaluator

        return evaluator.run(config, cluster)
    if cluster is not None and mode.serves(cluster):
        return mode.serve()
    watchdog = mode.watchdog()
    if watchdog_box is not None:
        watchdog_box.append(watchdog)
    mode.setup()
    if stop is not None:
        # TensorFlow's coordination service installs a SIGTERM handler of its
        # own when a multi-worker strategy starts; tftrain's comes back on top.
        stop.install()
    result = controller.run(
        config, mode, log=log, watchdog=watchdog, stop=stop, train_actions=train_actions
    )
    watchdog.stop()
    return result


def train(config: ExperimentConfig | str, **overrides) -> dict:
    """Trains, evaluates and exports one run, as ``tftrain train`` does
    (checkpoints, TensorBoard summaries, ``export/``, ``metrics.json``), and
    returns the final metrics: the dict metrics.json holds.

    Args:
      config: an ExperimentConfig, or an experiment's name or path (as
        ``--experiment`` takes it).
      overrides: fields of the config (``model_dir="runs/a"``, ``batch_size=64``)
        or the experiment's own options, by name.

    Raises:
      ConfigError, DataError: bad settings or data, before anything is written.
      UserCodeError: the task's own code raised (the original is its ``__cause__``).
      RunError: a run that cannot go on (DivergedError: it diverged).

    Signals are left to the caller: a KeyboardInterrupt ends the call, and the
    same call resumes from the last checkpoint. In a cluster (TF_CONFIG), a
    task that serves rather than trains returns ``{"exit_code": N}``.
    """
    # As `tftrain train` allocates, before the user's code runs (where the
    # caller has already allocated tensors, TensorFlow's allocator stays).
    resources.prepare_memory()
    if isinstance(config, str):
        from tftrain import registry

        config = registry.get(config)
    if not isinstance(config, ExperimentConfig):
        raise ConfigError(
            f"tftrain.train({type(config).__name__}): expected a tftrain.ExperimentConfig "
            "or an experiment's name or path."
        )
    return run(config.replace(**overrides))


def run(config: ExperimentConfig, *, log=print, train_actions=None) -> dict:
    """``train`` of a config: checked, then run; ``train_actions`` in place
    of the default ones (controller.run)."""
    resources.prepare_memory()
    config, cluster, mode = prepare(config)
    box = []
    try:
        result = execute(
            config, cluster, mode, log=log, watchdog_box=box, train_actions=train_actions
        )
    finally:
        for watchdog in box:
            watchdog.stop()
    return {"exit_code": result} if isinstance(result, int) else result

"""Checkpoints of a run: the model, the optimizer and the global step.

The global step is also the data position (the stream is a function of it),
so restoring these three resumes a run exactly. Every worker takes part in
a save (variable reads can be collective); only the chief keeps it.

A restore never trusts the newest checkpoint blindly: every tensor of it is
read back first. A checkpoint that is missing a file or cannot be read is
named, moved aside into ``checkpoints/damaged/`` (by the chief; nothing is
deleted) and the next newest is read back in turn; the checkpoint manager
then tracks only the others, so its rotation never deletes the last good
checkpoint in favour of a damaged one. A run never starts again from step 0 over
checkpoints it cannot read: that needs ``--restart`` (which sets the earlier
run's files aside) or a new ``--model_dir``.
"""

from __future__ import annotations

import os
import re

import tensorflow as tf

from tftrain import fileio
from tftrain.errors import ConfigError, RunError, first_line

_NUMBERED = re.compile(r"ckpt-(\d+)$")


def _recorded(folder: str) -> list[str] | None:
    """The checkpoints the ``checkpoint`` state file lists; None when it is
    missing, unreadable, lists none, lists anything but ``ckpt-N`` in
    ``folder``, or its latest checkpoint is not the last one it lists (a
    damaged file that still parses: cut short, it would list only older
    checkpoints)."""
    try:
        state = tf.train.get_checkpoint_state(folder)
    except (tf.errors.OpError, ValueError):
        return None
    if state is None or not state.all_model_checkpoint_paths:
        return None
    # TensorFlow has already put relative entries under ``folder``.
    listed = list(state.all_model_checkpoint_paths)
    if state.model_checkpoint_path != listed[-1]:
        return None
    if not all(
        os.path.normpath(os.path.dirname(p)) == os.path.normpath(folder)
        and _NUMBERED.search(os.path.basename(p))
        for p in listed
    ):
        return None
    return listed


def _candidates(folder: str, recorded: list[str] | None) -> list[str]:
    """The checkpoint prefixes in ``folder``, newest first: those the state
    file lists (``recorded``: a save counts once it is recorded there), or,
    when the state file is missing or damaged (None), every ``ckpt-N`` found."""
    if recorded is not None:  # in the order saved: the newest last
        return list(reversed(recorded))
    files = fileio.glob(folder, "ckpt-*.*")
    prefixes = {os.path.join(folder, os.path.basename(p).split(".", 1)[0]) for p in files}
    # Found by name, ordered by the step each holds: a stray copy of an old
    # checkpoint under a newer name must not win.
    numbered = [
        (_step_in(p, int(m.group(1))), int(m.group(1)), p)
        for p in prefixes
        if (m := _NUMBERED.search(p))
    ]
    return [p for *_, p in sorted(numbered, reverse=True)]


def _step_in(prefix: str, default: int) -> int:
    """The global step a checkpoint holds (``default``: its name's, when it
    cannot be read)."""
    try:
        return int(reader(prefix).get_tensor(_STEP_KEY))
    except Exception:  # noqa: BLE001 - unreadable: the damage check will say so
        return default


_STEP_KEY = "global_step/.ATTRIBUTES/VARIABLE_VALUE"


def reader(prefix: str):
    """A reader of the checkpoint at ``prefix``. Not ``tf.train.load_checkpoint``,
    which takes a prefix that is also a folder's name for the folder: on a
    filesystem whose folders are name prefixes (ram://), every one."""
    return tf.compat.v1.train.NewCheckpointReader(prefix)


def damage(prefix: str) -> str | None:
    """Why the checkpoint at ``prefix`` cannot be restored, or None if every
    tensor in it reads back."""
    if not fileio.exists(prefix + ".index"):
        return "its .index file is missing"
    if not fileio.glob(os.path.dirname(prefix), os.path.basename(prefix) + ".data-*"):
        return "its .data file is missing"
    try:
        read = reader(prefix)
        for name, dtype in read.get_variable_to_dtype_map().items():
            # An input iterator's state is a variant, which has no NumPy form:
            # its bytes are checked when the checkpoint is restored.
            if dtype != tf.variant:
                read.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - any failure to read is damage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"it cannot be read: {first[:200]}"
    return None


PREVIOUS = "previous"
# Checkpoint objects an older checkpoint may lack; such a checkpoint is
# restored without them.
OPTIONAL = ("model_state", "untrained_eval", "run_record")


def set_aside_run(model_dir: str) -> str | None:
    """Moves everything in ``model_dir`` (but earlier set-asides) into
    ``model_dir/previous/N`` (N: the next free number); returns that folder,
    or None when there was nothing to move."""
    if not fileio.isdir(model_dir):
        return None
    from tftrain.runlock import LOCK_NAME  # held by this run: it stays

    entries = [e for e in fileio.listdir(model_dir) if e not in (PREVIOUS, LOCK_NAME)]
    if not entries:
        return None
    root = os.path.join(model_dir, PREVIOUS)
    if fileio.exists(root) and not fileio.isdir(root):
        raise ConfigError(
            f"--restart moves the earlier run's files into {root}/, but {root} is a file: "
            "rename it or use a new --model_dir. Nothing was moved."
        )
    aside = None
    try:
        fileio.makedirs(root)
        taken = [int(n) for n in fileio.listdir(root) if n.isdigit()]
        aside = os.path.join(root, str(max(taken, default=0) + 1))
        fileio.makedirs(aside)
        for entry in entries:
            fileio.move(os.path.join(model_dir, entry), os.path.join(aside, entry))
    except (OSError, tf.errors.OpError) as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        moved = aside and fileio.isdir(aside) and fileio.listdir(aside)
        moved = f"; what was moved is in {aside}" if moved else ""
        raise ConfigError(
            f"--restart could not move the earlier run's files in {model_dir} aside: "
            f"{getattr(e, 'strerror', None) or first_line(e)[:300]}{where}. "
            f"Nothing was deleted{moved}."
        ) from None
    return aside


def _remove_unfinished_saves(folder: str) -> None:
    """Removes what a save cut off (a full disk, a kill) left: TensorFlow
    writes a checkpoint's shards into ``ckpt-N_temp/`` and moves them out
    when the save completes, so such a folder holds nothing restorable."""
    for temp in fileio.glob(folder, "ckpt-*_temp"):
        if fileio.isdir(temp):
            fileio.rmtree(temp)


def _write_state(folder: str, newest_first: list[str]) -> None:
    """Rewrites the ``checkpoint`` state file (a text proto) to list these only."""
    names = [os.path.basename(p) for p in reversed(newest_first)]
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{name}"' for name in names]
    # A timestamp for each, after the last preserved one (0): TensorFlow's
    # checkpoint manager rotates only the checkpoints listed with one.
    lines += [f"all_model_checkpoint_timestamps: {i + 1}" for i in range(len(names))]
    fileio.write_text_atomically(os.path.join(folder, "checkpoint"), "\n".join(lines) + "\n")


class Checkpoints:
    """Saves and restores a run's objects in ``model_dir/checkpoints``.

    Args:
      objects: name -> what each checkpoint holds.
      own_input: ``(iterator, worker_index)`` in a cluster whose workers
        each read their own input pipeline (a task's own tf.data stream):
        each worker keeps its iterator's position beside the checkpoint, in
        ``checkpoints/input/worker-I/ckpt-N`` (the one thing a worker other
        than the chief writes into model_dir), and restores its own, not
        the chief's.
    """

    def __init__(
        self,
        *,
        model_dir: str,
        out,
        objects: dict,
        step_counter,
        keep: int,
        is_chief: bool,
        log,
        own_input=None,
    ):
        self.model_dir, self.is_chief, self.log = model_dir, is_chief, log
        self.objects = objects
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.good = self._check_existing()
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, out.path("checkpoints"), max_to_keep=keep, step_counter=step_counter
        )
        self.last_saved: str | None = self.good[0] if self.good else None
        self.input_manager = None
        if own_input is not None:
            iterator, index = own_input
            self.input_folder = os.path.join(self.folder, "input", f"worker-{index}")
            # One more than the checkpoints kept: a worker saves its position
            # before the checkpoint of the same step, so a crash between the
            # two still leaves the position of every checkpoint kept.
            self.input_manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(input=iterator), self.input_folder, max_to_keep=keep + 1
            )

    @property
    def folder(self) -> str:
        return os.path.join(self.model_dir, "checkpoints")

    def _check_existing(self) -> list[str]:
        """The checkpoints from the newest readable one down, newest first.

        Checkpoints are read back newest first until one reads whole (only
        that one is restored; older ones are read only if it is damaged).
        Damaged ones are reported and (on the chief) moved aside, and the
        state file lists the rest.
        """
        recorded = _recorded(self.folder)
        candidates = _candidates(self.folder, recorded)
        damaged = []
        for prefix in candidates:
            why = damage(prefix)
            if why is None:
                break
            damaged.append(prefix)
            self.log(f"Checkpoint {prefix} is damaged ({why}); not using it.")
        good = candidates[len(damaged) :]
        if damaged and not good:
            raise RunError(
                f"every checkpoint in {self.folder} is damaged (newest: {damaged[0]}), so "
                "this run cannot resume, and it will not start again from step 0 over "
                "them. Run with --restart (the earlier run's files are moved into "
                f"{os.path.join(self.model_dir, PREVIOUS)}/) or a new --model_dir to "
                "start afresh. "
                "Nothing was changed."
            )
        state = os.path.join(self.folder, "checkpoint")
        state_damaged = recorded is None and fileio.exists(state)
        if state_damaged:
            self.log(f"The checkpoint state file in {self.folder} cannot be read; not using it.")
        # Found by name (the state file lost or damaged): the state file lists
        # them again, so that --keep_checkpoints rotates them as before.
        relisted = recorded is None and bool(good)
        if (damaged or state_damaged) and self.is_chief:
            aside = os.path.join(self.folder, "damaged")
            fileio.makedirs(aside)
            for prefix in damaged:
                for path in fileio.glob(self.folder, os.path.basename(prefix) + ".*"):
                    fileio.replace(path, os.path.join(aside, os.path.basename(path)))
            if state_damaged:
                fileio.replace(state, os.path.join(aside, "checkpoint"))
            self.log(f"Moved the damaged file(s) to {aside}; nothing was deleted.")
        if (damaged or relisted) and good and self.is_chief:
            _write_state(self.folder, good)
        if self.is_chief:
            _remove_unfinished_saves(self.folder)
        return good

    def restore_latest(self) -> str | None:
        """Restores the newest good checkpoint, if any; returns its path."""
        if not self.good:
            return None
        latest = self.good[0]
        checkpoint = self.checkpoint
        saved = {name.split("/", 1)[0] for name in reader(latest).get_variable_to_shape_map()}
        absent = [name for name in OPTIONAL if name in self.objects and name not in saved]
        if absent:
            # Written before tftrain saved these: resume without them.
            kept = {k: v for k, v in self.objects.items() if k not in absent}
            checkpoint = tf.train.Checkpoint(**kept)
            if "model_state" in absent and any(
                "seed_generator" in getattr(v, "path", v.name) for v in self.objects["model_state"]
            ):
                self.log(
                    f"{latest} was written by an earlier tftrain, without the model's "
                    "non-trainable state (a dropout layer's random seed): resuming from "
                    "it, this run draws other dropout masks than an uninterrupted one."
                )
        status = None
        try:
            status = checkpoint.restore(latest)
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            if status is not None:
                status.expect_partial()
            raise RunError(
                f"--model_dir={self.model_dir} holds a checkpoint ({latest}) "
                "that does not fit this run's model or optimizer "
                f"({str(e).splitlines()[0]}). Expected the same --model/--optimizer "
                "as the run that wrote it, --restart, or a new --model_dir. Nothing was changed."
            ) from None
        if self.input_manager is not None:
            self._restore_own_input(latest)
        return latest

    def _restore_own_input(self, latest: str) -> None:
        step = _NUMBERED.search(os.path.basename(latest)).group(1)
        path = os.path.join(self.input_folder, f"ckpt-{step}")
        why = "is missing" if not tf.io.gfile.exists(path + ".index") else None
        if why is None:
            try:
                self.input_manager.checkpoint.restore(path).assert_consumed()
                return
            except (AssertionError, ValueError, tf.errors.OpError) as e:
                why = f"cannot be restored: {str(e).splitlines()[0]}"
        # The weights and the step are restored: only the order of the data
        # differs from an uninterrupted run's, which is said.
        self.log(
            f"This worker's input position at {latest} ({path}) {why}: its input "
            "pipeline starts again from the beginning of its data, so the run sees "
            "other batches than an uninterrupted one would."
        )

    def save(self, step: int) -> str:
        if self.input_manager is not None:  # first: a checkpoint never lacks it
            self.input_manager.save(checkpoint_number=step)
        try:
            saved = self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError):
            if self.is_chief:  # a full disk: no half-written shards left behind
                _remove_unfinished_saves(self.folder)
            raise
        if not self.is_chief:  # every worker saves; only the chief keeps it
            fileio.rmtree(os.path.dirname(saved))
        self.last_saved = saved
        return saved

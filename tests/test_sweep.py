"""Bad input, swept with property-based tests: random flag values, random
TF_CONFIG documents and damaged IDX files. Each must end in tftrain's own
error (ConfigError, DataError: one line, exit 2 at the CLI) or be accepted
as a valid run; never any other exception. The number of examples is
bounded so CI stays fast; BUILD_NOTES.md keeps the table of cases."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from conftest import ROOT
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tftrain import cli, data
from tftrain.config import ConfigError, ExperimentConfig
from tftrain.distribute import base
from tftrain.distribute.cluster import parse_tf_config

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

FIELDS = [f for f in ExperimentConfig.__dataclass_fields__ if f not in ("experiment", "model_dir")]
NASTY = st.sampled_from(
    [
        "",
        "0",
        "-1",
        "1e9",
        "nan",
        "inf",
        "-inf",
        "1.5",
        "2000000000",
        "4294967296",
        "abc",
        "a,b",
        "1,-2",
        ",",
        "0,0",
        "auto",
        "none",
        "True",
        " ",
        "-0",
        "1e-300",
    ]
)
VALUES = st.one_of(
    NASTY,
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True).map(str),
    st.text(max_size=12),
)
DEFAULTS = {"model_dir": "/tmp/tftrain-sweep-never-written", "dataset": "synthetic"}


def parse(argv):
    """Flags -> (config, cluster, mode) as ``tftrain train`` does, or the error."""
    values = flags.FlagValues()
    cli.define_train_flags(values)
    values(["tftrain train", *argv])  # absl's own parse errors: flags.Error
    return cli.load_run(values)


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=4))
def test_random_flag_values_are_accepted_or_refused_with_tftrain_errors(monkeypatch, chosen):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    argv = [f"--{k}={v}" for k, v in {**DEFAULTS, **chosen}.items() if "\x00" not in v]
    try:
        config, _, mode = parse(argv)
    except (ConfigError, data.DataError, flags.Error) as e:
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    # Accepted: then the config is whole, and its own checks agree.
    assert config.validate() is config and mode.config is config


ADDRESS = st.one_of(
    st.sampled_from(["127.0.0.1:2222", "localhost:1", "[::1]:3", "h:0", "h:70000", "h", ":1"]),
    st.text(max_size=10),
    st.integers(),
)
CLUSTER = st.dictionaries(
    st.sampled_from(["chief", "worker", "ps", "evaluator", "master", ""]),
    st.one_of(st.lists(ADDRESS, max_size=3), ADDRESS, st.none()),
    max_size=4,
)
TASK = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["chief", "worker", "ps", "evaluator", "x"]),
            "index": st.one_of(st.integers(-2, 4), st.text(max_size=2), st.booleans()),
        }
    ),
    st.none(),
    st.integers(),
    st.text(max_size=5),
)
DOCUMENT = st.one_of(
    st.fixed_dictionaries({"cluster": CLUSTER, "task": TASK}).map(json.dumps),
    st.text(max_size=40),
    st.sampled_from(["{", "[]", "null", "1", '"x"', '{"cluster": {}}']),
)


@SETTINGS
@given(
    DOCUMENT,
    st.sampled_from(
        ["one_device", "mirrored", "multi_worker_mirrored", "parameter_server", "model_parallel"]
    ),
)
def test_random_tf_config_documents_are_parsed_or_refused(document, strategy):
    try:
        cluster = parse_tf_config(document)
        config = ExperimentConfig(strategy=strategy, model_dir="/unused").validate()
        base.mode_for(config, cluster)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


def _idx(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + (array.astype(np.uint8).tobytes())
    )


@SETTINGS
@given(
    st.sampled_from(
        [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ]
    ),
    st.sampled_from(["truncate", "flip", "append", "labels"]),
    st.integers(0, 10_000),
    st.integers(0, 255),
    st.booleans(),
)
def test_damaged_idx_files_load_whole_or_fail_with_a_data_error(
    tmp_path_factory, name, damage, where, byte, compressed
):
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (6, 28, 28))),
        "train-labels-idx1-ubyte": _idx(rng.integers(0, 10, (6,))),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (4, 28, 28))),
        "t10k-labels-idx1-ubyte": _idx(rng.integers(0, 10, (4,))),
    }
    raw = bytearray(files[name])
    where %= len(raw)
    if damage == "truncate":
        raw = raw[:where]
    elif damage == "flip":
        raw[where] = byte
    elif damage == "append":
        raw += bytes([byte]) * (where % 7 + 1)
    elif "labels" in name:
        raw[-1] = max(byte, 10)  # a label outside 0-9
    files[name] = bytes(raw)
    for file, content in files.items():
        path = os.path.join(folder, file + (".gz" if compressed else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(content) if compressed else content)
    try:
        ds = data.load_idx("fashion_mnist", str(folder))
    except data.DataError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert ds.num_classes == 10
    for split in (ds.train, ds.test):
        assert split.images.shape[1:] == (28, 28, 1) and len(split.images) == len(split.labels)
        assert split.labels.min() >= 0 and split.labels.max() < 10


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A run folder with checkpoints of steps 1-3 (variable values = the step)."""
    import tensorflow as tf

    model_dir = str(tmp_path_factory.mktemp("ckpts"))
    step = tf.Variable(0, dtype=tf.int64)
    weights = tf.Variable(tf.zeros([64, 32]))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(w=weights, global_step=step),
        os.path.join(model_dir, "checkpoints"),
        max_to_keep=3,
        step_counter=step,
    )
    for n in (1, 2, 3):
        step.assign(n)
        weights.assign(tf.fill([64, 32], float(n)))
        manager.save(checkpoint_number=n)
    return model_dir


def _all_files(folder):
    return sorted(f for _, _, files in os.walk(folder) for f in files)


DAMAGE = st.lists(
    st.tuples(
        st.sampled_from([3, 2, 1]),  # which checkpoint
        st.sampled_from([".index", ".data-00000-of-00001", "state"]),
        st.sampled_from(["delete", "truncate", "flip", "random", "empty"]),
        st.integers(0, 2**20),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(DAMAGE)
def test_damaged_checkpoints_fall_back_to_a_good_one_or_refuse(three_checkpoints, damages):
    """Any damage to any checkpoint files: the run resumes from the newest
    checkpoint that reads back whole, with exactly its values, or refuses with
    tftrain's RunError; no file is ever deleted."""
    import shutil
    import tempfile

    import tensorflow as tf

    from tftrain import checkpoints, controller
    from tftrain.errors import RunError

    model_dir = tempfile.mkdtemp(prefix="tftrain-ckpt-sweep-")
    try:
        shutil.copytree(three_checkpoints, model_dir, dirs_exist_ok=True)
        folder = os.path.join(model_dir, "checkpoints")
        touched = set()
        for which, suffix, how, where, byte in damages:
            path = os.path.join(
                folder, "checkpoint" if suffix == "state" else f"ckpt-{which}{suffix}"
            )
            if not os.path.exists(path):
                continue
            touched.add(which)
            event(f"{how} {suffix}")
            raw = bytearray(open(path, "rb").read())
            if how == "delete":
                os.remove(path)
                continue
            if how == "truncate":
                raw = raw[: where % max(len(raw), 1)]
            elif how == "flip" and raw:
                raw[where % len(raw)] ^= byte or 1
            elif how == "random":
                raw = bytearray(np.random.default_rng(where).integers(0, 256, len(raw), np.uint8))
            elif how == "empty":
                raw = bytearray()
            with open(path, "wb") as f:
                f.write(raw)
        before = _all_files(model_dir)
        step = tf.Variable(0, dtype=tf.int64)
        weights = tf.Variable(tf.zeros([64, 32]))
        logged = []
        try:
            ckpts = checkpoints.Checkpoints(
                model_dir=model_dir,
                out=controller._Output(model_dir, True, 0),
                objects={"w": weights, "global_step": step},
                step_counter=step,
                keep=3,
                is_chief=True,
                log=logged.append,
            )
            restored = ckpts.restore_latest()
        except RunError as e:
            assert str(e) and "\n" not in str(e)
            event("refused")
            return
        finally:
            assert _all_files(model_dir) == before or sorted(
                set(_all_files(model_dir)) - {"checkpoint", "checkpoint.tmp"}
            ) == sorted(set(before) - {"checkpoint"}), "a file was deleted"
        if restored is None:
            event("started afresh")
            # Only when no checkpoint file is left to trust: never over readable ones.
            left = checkpoints._candidates(folder, checkpoints._recorded(folder))
            assert all(checkpoints.damage(p) for p in left)
            return
        n = int(restored.rsplit("-", 1)[1])
        event(f"restored {n}")
        assert int(step.numpy()) == n and np.all(weights.numpy() == n)
        if n not in touched:  # an untouched checkpoint newer than it would have been used
            assert all(m in touched for m in range(n + 1, 4))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["--seed=4294967296"],
        ["--log_interval_secs=nan"],
        ["--warmup_epochs=1e9"],
        ["--hidden_units=1,-2", "--model=mlp"],
        ["--num_microbatches=0"],
        ["--train_steps=-5"],
        ["--collective_pack_bytes=-1"],
        ["--lr_decay_rate=2"],
    ],
)
def test_the_cli_says_one_line_and_exits_2(tmp_path, argv):
    """A sample of the sweep through the real command: the message format and exit code."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tftrain",
            "train",
            "--dataset=synthetic",
            f"--model_dir={tmp_path / 'run'}",
            *argv,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("tftrain: error: --") and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _changed(value):
    """Another value of the same kind as ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, 7)
    if value is None:
        return 5
    return None  # a field this sweep does not change (the task, options)


_BASE = ExperimentConfig(model_dir="unused")
_CHANGEABLE = [
    f
    for f in FIELDS
    if f not in ("task", "options", "builtin_task") and _changed(getattr(_BASE, f)) is not None
]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A checkpoint that records _BASE's identity, as every run's does."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("record")
    record = tf.Variable(json.dumps(_BASE.identity()), dtype=tf.string)
    return tf.train.Checkpoint(run_record=record).write(str(folder / "ckpt-1"))


@SETTINGS
@given(changes=st.sets(st.sampled_from(_CHANGEABLE), min_size=1, max_size=4))
def test_a_resume_is_refused_exactly_when_it_would_change_the_run(recorded_run, changes):
    """Random sets of changed flags: refused, naming each changed flag of the
    run's identity (up to three, then a count), when any is one; accepted
    when all may change on a resume."""
    from types import SimpleNamespace

    from tftrain.config import MAY_CHANGE_ON_RESUME
    from tftrain.controller import Controller

    config = _BASE.replace(**{f: _changed(getattr(_BASE, f)) for f in changes})
    identity = sorted(f for f in changes if f not in MAY_CHANGE_ON_RESUME)
    event(f"{len(identity)} of the identity")
    check = lambda: Controller._check_same_run(SimpleNamespace(config=config), recorded_run)
    if not identity:
        check()
        return
    with pytest.raises(ConfigError) as refused:
        check()
    said = str(refused.value)
    assert "Nothing was changed" in said and recorded_run in said
    for name in identity[:3]:
        assert f"--{name}=" in said, (name, said)
    if len(identity) > 3:
        assert f"({len(identity) - 3} more)" in said

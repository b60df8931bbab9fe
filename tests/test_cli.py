"""End-to-end: the tftrain command as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import run_tftrain, start_tftrain


def event_tags(folder):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(folder)
    acc.Reload()
    return set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])


def snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment", ["fashion_mnist_softmax", "fashion_mnist_mlp", "fashion_mnist_cnn"]
)
def test_each_experiment_smoke_run_leaves_everything_in_model_dir(
    tmp_path, experiment, fashion_mnist_dir
):
    model_dir = str(tmp_path / "run")
    result = run_tftrain("train", f"--experiment={experiment}:smoke", f"--model_dir={model_dir}")
    assert "Traceback" not in result.stderr
    # TensorFlow's C++ start-up lines are kept off the console.
    for noise in ("InitializeLog", "cuInit", "cudart_stub", "oneDNN custom operations"):
        assert noise not in result.stderr + result.stdout
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    for key in ("eval_accuracy", "eval_loss", "global_step", "examples_per_second"):
        assert key in metrics
    assert metrics["global_step"] > 0 and metrics["eval_examples"] > 0
    assert metrics["eval_accuracy"] > 0.3  # far above chance (0.1) after a few steps
    assert {"loss", "accuracy", "learning_rate", "examples_per_second"} <= event_tags(
        os.path.join(model_dir, "train")
    )
    assert {"loss", "accuracy"} <= event_tags(os.path.join(model_dir, "eval"))
    assert os.listdir(os.path.join(model_dir, "checkpoints"))
    # The console shows progress and a final summary.
    assert "step " in result.stdout and "examples/s" in result.stdout
    assert "ETA" in result.stdout and "Done: step" in result.stdout

    # The export reproduces metrics.json's accuracy on the same test images.
    import tensorflow as tf

    from tftrain import data

    test = data.load("fashion_mnist", fashion_mnist_dir).test.take(metrics["eval_examples"])
    served = tf.saved_model.load(os.path.join(model_dir, "export"))
    logits = served.signatures["serving_default"](images=tf.constant(test.images, tf.float32))
    logits = next(iter(logits.values())).numpy()
    assert logits.shape == (len(test), 10)
    accuracy = float((logits.argmax(-1) == test.labels).mean())
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint_exactly(tmp_path):
    common = [
        "--experiment=fashion_mnist_mlp:smoke",
        "--train_steps=200",
        "--checkpoint_interval=20",
        "--steps_per_loop=20",
        "--eval_interval=1000",
    ]
    straight = str(tmp_path / "straight")
    run_tftrain("train", *common, f"--model_dir={straight}")

    model_dir = str(tmp_path / "killed")
    proc = start_tftrain(
        "train",
        *common,
        f"--model_dir={model_dir}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a checkpoint past the first
        # The state file names a checkpoint only once it is whole (its index
        # file appears first: waiting on that raced with the state file).
        state = os.path.join(ckpt_dir, "checkpoint")
        if os.path.exists(state) and 'model_checkpoint_path: "ckpt-20"' not in open(state).read():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import tensorflow as tf

    killed_at = int(tf.train.latest_checkpoint(ckpt_dir).rsplit("-", 1)[1])
    assert 40 <= killed_at < 200, "the run was not killed in the middle"

    resumed = run_tftrain("train", *common, f"--model_dir={model_dir}")
    assert f"Resumed from {ckpt_dir}/ckpt-{killed_at} at step {killed_at}" in resumed.stdout
    got = json.load(open(os.path.join(model_dir, "metrics.json")))
    want = json.load(open(os.path.join(straight, "metrics.json")))
    assert got["global_step"] == 200
    # Same data position and state: the very same weights as the run never killed.
    assert got["weights_sha256"] == want["weights_sha256"]
    assert got["eval_loss"] == want["eval_loss"]


def test_a_resumed_run_with_dropout_draws_the_same_masks(tmp_path):
    # The CNN's dropout layer keeps its seed generator's state outside Keras's
    # checkpoint graph of the model: a resume that lost it drew other masks
    # and ended with other weights.
    common = [
        "--experiment=fashion_mnist_cnn:smoke",
        "--lr_schedule=constant",
        "--steps_per_loop=5",
        "--eval_interval=1000",
        "--noexport",
    ]
    straight = str(tmp_path / "straight")
    run_tftrain("train", *common, "--train_steps=20", f"--model_dir={straight}")
    resumed = str(tmp_path / "resumed")
    run_tftrain("train", *common, "--train_steps=10", f"--model_dir={resumed}")
    second = run_tftrain("train", *common, "--train_steps=20", f"--model_dir={resumed}")
    assert "at step 10" in second.stdout
    got = json.load(open(os.path.join(resumed, "metrics.json")))
    want = json.load(open(os.path.join(straight, "metrics.json")))
    assert got["weights_sha256"] == want["weights_sha256"]


BAD_INPUT = [
    (["--learning_rate=-0.5"], "--learning_rate=-0.5: expected a number > 0"),
    (["--model=resnet"], "--model=resnet: expected one of softmax, mlp, cnn"),
    (["--optimizer=rmsprop"], "--optimizer=rmsprop: expected one of"),
    (
        ["--strategy=mirrored", "--num_replicas=3", "--batch_size=100"],
        "--batch_size=100 does not split evenly over 3 replicas",
    ),
    (["--experiment=nope"], "--experiment=nope: no experiment 'nope'"),
    (["--data_dir=/nonexistent"], "apt-get install dataset-fashion-mnist"),
    (["--batch_size=abc"], "--batch_size=abc"),
    (["--no_such_flag=1"], "tftrain: error: Unknown command line flag 'no_such_flag'"),
    (["--epochs=1.5"], "tftrain: error: flag --epochs=1.5: invalid literal for int()"),
    (
        ["--export=maybe"],
        "tftrain: error: flag --export=maybe: expected true or false, not 'maybe'",
    ),
    (["--flagfile=/nonexistent"], "tftrain: error: ERROR:: Unable to open flagfile"),
    (
        ["--strategy=multi_worker_mirrored"],
        "--strategy=multi_worker_mirrored needs a cluster in TF_CONFIG",
    ),
    (
        ["--model=mlp", "--hidden_units=2000000000"],
        "--model=mlp would have 1,590,000,000,010 parameters",
    ),
    (["--embedding_shards=2"], "--embedding_shards applies to --model=embedding_bag"),
    (
        ["--model=mlp", "--hidden_units=a,b"],
        "--hidden_units=a,b: expected a comma-separated list of ints",
    ),
    (["--strategy=pipeline"], "--strategy=pipeline: expected one of one_device"),
    (["--strategy=model_parallel", "--num_stages=0"], "--num_stages=0: expected a positive"),
    (["--num_stages=2"], "--num_stages applies to --strategy=model_parallel only"),
    (["--strategy=model_parallel", "--num_stages=9"], "softmax can be cut into at most 3 piece(s)"),
    (["--optimizer=adam", "--momentum=0.9"], "--momentum applies to --optimizer=sgd"),
    (["--seed=-1"], "--seed=-1: expected an integer in 0-4294967295"),
    (["--inter_op_threads=100000"], "--inter_op_threads=100000: expected 0"),
    (
        ["--model=embedding_bag"],
        "--model=embedding_bag takes tokens, but --dataset=fashion_mnist holds images: "
        "expected one of softmax, mlp, cnn",
    ),
    (
        ["--dataset=synthetic_tokens", "--model=mlp"],
        "--model=mlp takes images, but --dataset=synthetic_tokens holds tokens: "
        "expected one of embedding_bag",
    ),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT)
def test_bad_input_one_message_no_traceback_model_dir_untouched(tmp_path, flags, message):
    model_dir = tmp_path / "mine"
    model_dir.mkdir()
    (model_dir / "notes.txt").write_text("the user's own file")
    before = snapshot(str(model_dir))
    result = run_tftrain(
        "train",
        "--experiment=fashion_mnist_softmax:smoke",
        f"--model_dir={model_dir}",
        *flags,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tftrain: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(str(model_dir)) == before


@pytest.mark.parametrize(
    "tf_config, message",
    [
        ("{oops", "TF_CONFIG is not valid JSON"),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
            "task index 3 is out of range",
        ),
        (
            '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker"}}',
            "but --strategy=one_device runs in one process",
        ),
    ],
)
def test_bad_tf_config_is_reported_before_any_work(tmp_path, tf_config, message):
    result = run_tftrain(
        "train",
        "--experiment=fashion_mnist_softmax:smoke",
        f"--model_dir={tmp_path / 'r'}",
        env={"TF_CONFIG": tf_config},
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_unwritable_model_dir_is_one_clear_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder is needed")
    result = run_tftrain(
        "train",
        "--experiment=fashion_mnist_softmax:smoke",
        f"--model_dir={blocked}/run",
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--model_dir={blocked}/run cannot be written: Not a directory" in result.stderr
    assert blocked.read_text() == "a file where a folder is needed"


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    model_dir = str(tmp_path / "run")
    run_tftrain(
        "train",
        "--experiment=fashion_mnist_softmax:smoke",
        "--train_steps=5",
        f"--model_dir={model_dir}",
    )
    before = snapshot(model_dir)
    result = run_tftrain(
        "train", "--experiment=fashion_mnist_mlp:smoke", f"--model_dir={model_dir}", check=False
    )
    assert result.returncode == 2
    assert (
        "--experiment=fashion_mnist_softmax:smoke there, --experiment=fashion_mnist_mlp:smoke here"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "could not be found in the restored object" not in result.stderr  # one line only
    assert snapshot(model_dir) == before


def test_a_resume_that_would_change_the_run_is_refused_whatever_became_of_config_json(
    tmp_path,
):
    # The run's identity is kept in its checkpoints: a lost or edited
    # config.json cannot hide a change.
    model_dir = str(tmp_path / "run")
    smoke = ["--experiment=fashion_mnist_mlp:smoke", "--train_steps=10", "--noexport"]
    run_tftrain("train", *smoke, f"--model_dir={model_dir}")
    config_json = os.path.join(model_dir, "config.json")
    for change, said, config_left in (
        ("--optimizer=sgd", "--optimizer=adam there, --optimizer=sgd here", "as written"),
        ("--seed=3", "--seed=0 there, --seed=3 here", "deleted"),
        ("--precision=bfloat16", "--precision=float32 there, --precision=bfloat16 here", "edited"),
    ):
        if config_left == "deleted" and os.path.exists(config_json):
            os.remove(config_json)
        if config_left == "edited":
            with open(config_json, "w") as f:
                json.dump({"precision": "bfloat16", "seed": 0}, f)
        before = snapshot(model_dir)
        result = run_tftrain(
            "train", *smoke, "--train_steps=20", change, f"--model_dir={model_dir}", check=False
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert snapshot(model_dir) == before


def test_usage_and_help():
    result = run_tftrain(check=False)
    assert result.returncode == 2 and "usage: tftrain <command>" in result.stderr
    assert result.stderr.startswith("tftrain: error: expected a command")
    assert run_tftrain("--help").stdout.startswith("usage: tftrain <command>")
    for asked in ("--helpshort", "--help", "-h"):
        helped = run_tftrain("train", asked, check=False)
        assert helped.returncode == 0, asked
        assert helped.stdout.startswith("usage: tftrain train [flags]")
        assert "--strategy: one_device, mirrored" in helped.stdout
    assert run_tftrain("launch", "-h").stdout.startswith(
        "usage: tftrain launch [flags] [-- <train flags>]"
    )
    launch_help = run_tftrain("launch", "--helpshort", check=False)
    assert "--num_workers" in launch_help.stdout and "--max_restarts" in launch_help.stdout


def test_help_shows_the_effective_defaults():
    def default_of(text, flag):
        block = text.split(f"--{flag}:", 1)[1].split("\n  --", 1)[0]
        return block.split("(default: ", 1)[1].split(")", 1)[0]

    built_in = run_tftrain("train", "--helpshort").stdout
    assert "Defaults shown are the built-in ones" in built_in
    assert default_of(built_in, "learning_rate") == "'0.001'"
    assert default_of(built_in, "epochs") == "'1'"
    mlp = run_tftrain("train", "--helpshort", "--experiment=fashion_mnist_mlp").stdout
    assert "Defaults shown are those of --experiment=fashion_mnist_mlp" in mlp
    assert default_of(mlp, "model") == "'mlp'" and default_of(mlp, "epochs") == "'20'"
    assert default_of(mlp, "lr_schedule") == "'cosine'"


def test_flagfile_and_flags_override_the_experiment(tmp_path):
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text("--experiment=fashion_mnist_softmax:smoke\n--train_steps=3\n")
    model_dir = tmp_path / "run"
    run_tftrain(
        "train", f"--flagfile={flagfile}", "--batch_size=50", "--seed=4", f"--model_dir={model_dir}"
    )
    config = json.load(open(model_dir / "config.json"))
    assert config["batch_size"] == 50 and config["train_steps"] == 3
    assert config["seed"] == 4 and config["learning_rate"] == 0.01  # the experiment's
    assert json.load(open(model_dir / "metrics.json"))["global_step"] == 3


def test_same_seed_same_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        run_tftrain(
            "train",
            "--dataset=synthetic",
            "--model=mlp",
            "--train_steps=30",
            "--batch_size=50",
            f"--model_dir={d}",
        )
    ma, mb = (json.load(open(d / "metrics.json")) for d in (a, b))
    assert ma["weights_sha256"] == mb["weights_sha256"]
    assert np.isclose(ma["eval_loss"], mb["eval_loss"], rtol=0, atol=0)


def test_a_full_disk_and_exhausted_memory_are_said_in_one_line():
    import tensorflow as tf

    from tftrain import cli
    from tftrain.config import ExperimentConfig

    config = ExperimentConfig(model_dir="/runs/a")
    full = tf.errors.ResourceExhaustedError(
        None, None, "runs/a/ckpt-3.data: No space left on device"
    )
    said = cli._explain_resources(full, config)
    assert said.startswith("the disk is full (") and "--model_dir=/runs/a" in said
    # TensorFlow puts the reason after a long file name on the same line.
    long = tf.errors.ResourceExhaustedError(
        None, None, "{{function_node x}} /r/" + "p" * 300 + ".tempstate; No space left on device"
    )
    assert cli._explain_resources(long, config).startswith("the disk is full (")
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor\nmore")
    assert cli._explain_resources(oom, config) == (
        "out of memory (OOM when allocating tensor): try a smaller model or --batch_size."
    )
    assert cli._explain_resources(tf.errors.CancelledError(None, None, "x"), config) is None


def test_only_tensorflows_start_up_lines_are_filtered():
    from tftrain import quiet

    dropped = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795868752.466742    8000 port.cc:153] oneDNN custom operations are on.",
        "I0000 00:00:1795868752.467071    8000 cudart_stub.cc:31] Could not find cuda drivers",
        "E0000 00:00:1795868753.727477    8000 cuda_platform.cc:52] failed call to cuInit: x",
        "E0000 00:00:1796500647.801259   14573 util.cc:131] oneDNN supports DT_BFLOAT16 only on "
        "platforms with AVX-512. Falling back to the default Eigen-based implementation",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
    ]
    kept = [
        "tftrain: error: --seed=-1: expected an integer in 0-4294967295.",
        "E0000 00:00:1795868753.727477    8000 grpc_server_lib.cc:52] could not bind",
        "E0000 00:00:1796500647.801259   14573 util.cc:131] something else",
        "Traceback (most recent call last):",
        "W1128 13:49:29.519092 140628470201216 polymorphic_function.py:157] retracing",
    ]
    assert all(quiet.is_noise(line) for line in dropped)
    assert not any(quiet.is_noise(line) for line in kept)


def test_what_the_runtime_writes_before_a_crash_still_reaches_the_console():
    import subprocess

    code = (
        "import os\n"
        "from tftrain import quiet\n"
        "quiet.filter_native_stderr()\n"
        "os.write(2, b'I0000 00:00:1.2    8 cudart_stub.cc:31] Could not find cuda drivers\\n')\n"
        "os.write(2, b'F0000 00:00:1.2    8 tensor.cc:9] Check failed: 1 == 2\\n')\n"
        "os.abort()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"Check failed: 1 == 2" in result.stderr and b"cudart_stub" not in result.stderr


def test_a_run_folder_that_stops_being_writable_is_one_line_naming_the_file(tmp_path):
    import tensorflow as tf

    from tftrain import cli, config

    error = tf.errors.PermissionDeniedError(
        None,
        None,
        "{{function_node __wrapped__SaveV2_dtypes_25_device_/job:localhost}} "
        "run/checkpoints/ckpt-60_temp; Operation not permitted [Op:SaveV2]\nmore",
    )
    said = cli._explain_resources(error, config.ExperimentConfig(model_dir=str(tmp_path)))
    assert said == (
        f"permission denied writing in --model_dir={tmp_path} (run/checkpoints/ckpt-60_temp; "
        "Operation not permitted): make it writable again, then run the same command to "
        "start again (no checkpoint had been saved yet)."
    )


@pytest.fixture(scope="module")
def broken_test_splits(tmp_path_factory):
    """Folders of IDX files whose training split is Fashion-MNIST's and whose
    test split is wrong: another image shape, empty, a FIFO."""
    import shutil

    from tests.test_data import write_idx

    root = tmp_path_factory.mktemp("splits")
    source = "/usr/share/datasets/fashion-mnist"
    for case, images, labels in (
        ("shape", np.zeros((100, 14, 56), np.uint8), np.zeros(100, np.uint8)),
        ("empty", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8)),
        ("fifo", None, np.zeros(100, np.uint8)),
    ):
        folder = root / case
        folder.mkdir()
        for name in os.listdir(source):
            if name.startswith("train-"):
                shutil.copy(os.path.join(source, name), folder)
        if images is None:
            os.mkfifo(folder / "t10k-images-idx3-ubyte")
        else:
            write_idx(str(folder / "t10k-images-idx3-ubyte"), images)
        write_idx(str(folder / "t10k-labels-idx1-ubyte"), labels)
    return root


@pytest.mark.parametrize(
    "case, message",
    [
        ("shape", "gives features of uint8[14, 56, 1] per example; the training data's are"),
        ("empty", "gives no batch: the evaluation data are empty"),
        ("fifo", "t10k-images-idx3-ubyte is not a regular file (a FIFO"),
    ],
)
def test_a_test_split_unlike_the_training_split_is_one_line_before_anything_is_written(
    tmp_path, broken_test_splits, case, message
):
    model_dir = tmp_path / "run"
    result = run_tftrain(
        "train",
        "--experiment=fashion_mnist_mlp:smoke",
        f"--data_dir={broken_test_splits / case}",
        f"--model_dir={model_dir}",
        check=False,
        timeout=120,  # a FIFO read would wait forever
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("tftrain: error: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not model_dir.exists()


def test_a_lost_task_is_named_by_its_address():
    import socket

    from tftrain import cli
    from tftrain.distribute.cluster import parse_tf_config

    live, gone = socket.socket(), socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen()
    gone.bind(("127.0.0.1", 0))
    gone_port = gone.getsockname()[1]
    gone.close()  # nothing listens there any more
    try:
        spec = {
            "worker": [
                f"127.0.0.1:{live.getsockname()[1]}",
                f"127.0.0.1:{gone_port}",
                "127.0.0.1:600",
            ]
        }
        cluster = parse_tf_config(
            json.dumps({"cluster": spec, "task": {"type": "worker", "index": 2}})
        )
        said = f"failed to connect to all addresses; last error: ipv4:{spec['worker'][0]}: Failed"
        assert cli._tasks_named_in(said, cluster) == f"worker:0 at {spec['worker'][0]}"
        # No address in TensorFlow's words (or only its own): the task whose
        # port refuses a connection is the one gone; a live one is not named.
        expected = f"worker:1 at 127.0.0.1:{gone_port} (nothing listens there now)"
        assert cli._tasks_named_in("recvmsg:Connection reset by peer", cluster) == expected
        assert cli._tasks_named_in("ipv4:127.0.0.1:600 and more", cluster) == expected
    finally:
        live.close()

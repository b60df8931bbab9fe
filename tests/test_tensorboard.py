"""What a person sees in TensorBoard: a real ``tensorboard`` on loopback over
a finished run, read through its HTTP API, and its scalars dashboard in
headless Chromium."""

import json
import os
import sys
import time

import pytest

from tests.conftest import ROOT, run_tftrain

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from tensorboard_view import (  # noqa: E402
    DRAWN,
    TensorBoard,
    chart_pixels,
    chromium,
    dom,
    drawn_series,
    screenshot,
    screenshot_drawn,
    time_series_page,
)

pytestmark = pytest.mark.slow

FLAGS = [
    "--experiment=fashion_mnist_softmax:smoke",
    "--steps_per_loop=5",
    "--histogram_every=10",
    "--profile_steps=5,15",
    "--learning_rate=0.02",
]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    model_dir = str(runs / "softmax")
    run_tftrain("train", *FLAGS, f"--model_dir={model_dir}")
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with TensorBoard(str(runs)) as tb:
        assert sorted(tb.wait_for_runs(3)) == ["softmax", "softmax/eval", "softmax/train"]
        deadline = time.time() + 60  # TensorBoard reads the event files in the background
        while len(points(tb, "softmax/train", "loss")) < 4 and time.time() < deadline:
            time.sleep(1)
        yield tb, metrics


def points(tb, run, tag):
    return {
        step: value
        for _, step, value in tb.get(f"/data/plugin/scalars/scalars?run={run}&tag={tag}")
    }


def test_every_dashboard_has_data(board):
    tb, _ = board
    listing = tb.get("/data/plugins_listing")
    for plugin in ("scalars", "histograms", "distributions", "graphs", "hparams", "profile"):
        assert listing[plugin]["enabled"], plugin


def test_scalars_start_at_step_0_and_end_at_metrics_json(board):
    tb, metrics = board
    assert points(tb, "softmax/train", "learning_rate")[0] == pytest.approx(0.02)
    eval_loss = points(tb, "softmax/eval", "loss")
    assert sorted(eval_loss) == [0, 20]  # the untrained model, then the end
    assert eval_loss[20] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    eval_accuracy = points(tb, "softmax/eval", "accuracy")
    assert eval_accuracy[20] == pytest.approx(metrics["eval_accuracy"], rel=1e-6)
    assert sorted(points(tb, "softmax/train", "loss")) == [5, 10, 15, 20]
    assert all(v > 0 for v in points(tb, "softmax/train", "gradient_norm").values())


def test_hparams_table_holds_the_flags_and_final_metrics(board):
    tb, metrics = board
    groups = tb.get(
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 10,
        },
    )["sessionGroups"]
    (group,) = groups
    hparams = group["hparams"]
    assert hparams["optimizer"] == "adam" and hparams["learning_rate"] == pytest.approx(0.02)
    assert hparams["experiment"] == "fashion_mnist_softmax:smoke" and hparams["batch_size"] == 100
    final = {(m["name"]["group"], m["name"]["tag"]): m["value"] for m in group["metricValues"]}
    assert final[("eval", "accuracy")] == pytest.approx(metrics["eval_accuracy"], rel=1e-6)
    assert final[("eval", "loss")] == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_histograms_graph_and_profile(board):
    tb, _ = board
    tags = tb.get("/data/plugin/histograms/tags")["softmax/train"]
    assert {"weights/logits/kernel", "gradients/logits/kernel"} <= set(tags)
    kernel = tb.get(
        "/data/plugin/histograms/histograms?run=softmax/train&tag=weights/logits/kernel"
    )
    assert [step for _, step, _ in kernel] == [10, 20]
    graph = tb.get("/data/plugin/graphs/graph?run=softmax/train")
    assert "MatMul" in graph
    profiled = tb.get("/data/plugin/profile/runs")
    assert profiled, "no profile run listed"


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed")
def test_the_time_series_dashboard_draws_the_loss_curves(board, tmp_path):
    tb, _ = board
    page = time_series_page(tb.url, "^loss$")
    for _ in range(5):  # the page draws within Chromium's virtual time budget, mostly
        cards = drawn_series(dom(page))
        if cards.get("loss"):
            break
        time.sleep(3)
    # One line per run: eval at steps 0 and 20, train at 5, 10, 15 and 20.
    assert cards == {"loss": [2, 4]}
    picture = str(tmp_path / "loss.png")
    assert screenshot_drawn(page, picture) > DRAWN  # the lines' pixels
    blank = str(tmp_path / "blank.png")  # the same card without SVG: no lines
    screenshot(page.replace("forceSVG=true", "forceSVG=false"), blank)
    assert chart_pixels(blank) < DRAWN


@pytest.mark.parametrize("installed", [True, False])
def test_the_profile_line_says_when_the_tab_needs_its_plugin(monkeypatch, tmp_path, installed):
    import tensorflow as tf

    from tftrain import actions

    monkeypatch.setattr(actions, "profile_plugin_installed", lambda: installed)
    monkeypatch.setattr(tf.profiler.experimental, "start", lambda folder: None)
    monkeypatch.setattr(tf.profiler.experimental, "stop", lambda: None)
    said = []
    profile = actions.Profile(2, 4, str(tmp_path), said.append)
    profile.begin(2)
    profile(type("Output", (), {"step": 4})())
    assert len(said) == 1 and said[0].startswith("profiled steps 3-4")
    assert ("pip install 'tftrain[profile]'" in said[0]) is not installed

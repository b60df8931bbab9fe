"""benchmarks.step_profile's reading of a trace's op events."""

import pytest

from benchmarks import step_profile


def test_ops_are_summed_per_step_and_grouped_by_kind():
    ms = 1_000_000  # ns
    adam = "while/body/_1/while/adam/ResourceApplyAdam:ResourceApplyAdam"
    events = [
        # thread, name, start, duration: two steps on two threads
        ("tf_Compute/1", "while/body/_1/model/dense/Relu:_MklNativeFusedMatMul", 0, 4 * ms),
        ("tf_Compute/1", "ExecutorState::Process", 0, 10 * ms),
        ("tf_Compute/2", adam, 4 * ms, ms),
        ("tf_Compute/2", "while/body/_1/model/pool/MaxPool:MaxPool", 5 * ms, 2 * ms),
        ("tf_Compute/1", "while/body/_1/model/dense/Relu:_MklNativeFusedMatMul", 10 * ms, 4 * ms),
        ("tf_Compute/2", adam, 14 * ms, ms),
        ("tf_Compute/1", "ThreadpoolListener::Record", 19 * ms, ms),
        ("tf_Compute/2", "while/body/_1/SGD/AssignSubVariableOp:AssignSubVariableOp", 18 * ms, ms),
    ]
    summary = step_profile.summarize(events, steps=2)
    assert summary["wall_ms"] == pytest.approx(9.5)  # 0 to 19 ms, bookkeeping left out
    assert summary["by_kind"] == pytest.approx(
        {"matrix products": 4.0, "optimizer update": 1.5, "the rest": 1.0}
    )
    assert summary["by_op"][("model/dense/Relu", "_MklNativeFusedMatMul")] == pytest.approx(4.0)
    assert summary["calls"][("adam/ResourceApplyAdam", "ResourceApplyAdam")] == pytest.approx(1.0)


def test_a_trace_without_ops_is_an_error():
    with pytest.raises(SystemExit, match="no ops"):
        step_profile.summarize([("tf_Compute/1", "ExecutorState::Process", 0, 5)], steps=1)

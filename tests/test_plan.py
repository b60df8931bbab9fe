"""tftrain plan: the cost model's directions on synthetic inputs, the
cluster spec, and the command as a user runs it."""

import dataclasses
import json
import math
import os
import signal
import subprocess

import pytest

from tests.conftest import alive as _alive
from tests.conftest import proc_stat, run_tftrain
from tftrain import costmodel, plan

# A CPU worker that needs 0.2 ms a step and 10 us an example on one core,
# and half of that per example on two.
COMPUTE = costmodel.Compute(((1, 2e-4, 1e-5), (2, 2e-4, 5e-6)))
LAN = costmodel.Link(bandwidth=10e9 / 8, latency=50e-6)  # 10 Gbit/s


def _links(network=LAN):
    return costmodel.Links(ring=network, ring_call=0.0, grpc=network, ps_step=1e-3)


def _cluster(workers, network=LAN, cores=2):
    return costmodel.Cluster(workers, cores, network, local=False)


def test_the_ring_and_the_bubble_are_the_textbook_formulas():
    link = costmodel.Link(bandwidth=1e9, latency=1e-5)
    # 2(N-1)/N x bytes / bandwidth + 2(N-1) x latency
    assert costmodel.ring_seconds(8e6, 4, link) == pytest.approx(6 / 4 * 8e6 / 1e9 + 6 * 1e-5)
    assert costmodel.ring_seconds(8e6, 1, link) == 0.0
    assert costmodel.bubble_fraction(2, 1) == pytest.approx(0.5)
    assert costmodel.bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_compute_passes_through_what_was_measured_and_follows_amdahl_between():
    compute = costmodel.Compute(((1, 1e-3, 4e-5), (4, 4e-4, 1.6e-5)))
    assert compute.seconds(100, 1) == pytest.approx(1e-3 + 4e-3)
    assert compute.seconds(100, 4) == pytest.approx(4e-4 + 1.6e-3)
    between = [compute.seconds(100, c) for c in (1, 2, 3, 4, 8, 64)]
    assert between == sorted(between, reverse=True)  # more cores: never slower
    # Amdahl: a serial part remains however many cores.
    assert compute.seconds(100, 10**6) > 0.2 * compute.seconds(100, 4)


def test_a_term_measured_as_nothing_at_one_core_count_is_taken_as_measured():
    # The batch's effect lost in the noise at 2 cores: the fit put it all
    # per example there (overhead 0); the other count has both terms.
    compute = costmodel.Compute(((1, 4e-4, 1e-5), (2, 0.0, 6e-6)))
    assert compute.seconds(100, 2) == pytest.approx(6e-4)
    assert compute.seconds(100, 1) == pytest.approx(4e-4 + 1e-3)
    for cores in (1.5, 3, 8):
        assert math.isfinite(compute.seconds(100, cores)) and compute.seconds(100, cores) > 0
    # A step in micro-batches timed as fast as one without at 1 core: the
    # micro-batch's cost is taken from the count that measured one.
    # (COMPUTE's fixed cost is the same at both counts.)
    micro = dataclasses.replace(COMPUTE, microbatch=((1, 0.0), (2, 1e-4)))
    assert micro.microbatch_seconds(1) == pytest.approx(1e-4)
    assert micro.microbatch_seconds(2) == pytest.approx(1e-4)
    # The step's fixed cost measured as nothing at the count that measured a
    # micro-batch's cost: taken as measured, not scaled by a ratio to zero
    # (the CNN's launched pipeline was once predicted at 0 examples/s so).
    flat = costmodel.Compute(((1, 0.019, 1.6e-3), (2, 0.0, 1.4e-3)), ((1, 0.0), (2, 6e-4)))
    assert flat.microbatch_seconds(1) == pytest.approx(6e-4)
    cut = costmodel.Model(parameter_bytes=10**6, stages={2: ((0.7, 0.3), (50176.0,))})
    here = plan.parse_cluster("local", cores=2)
    launched = costmodel.model_parallel(cut, flat, 100, here, _links(), 2, 4, processes=True)
    assert 0.5 * 100 / flat.seconds(100, 2) < launched.examples_per_second < 100 / 0.019


def test_tasks_side_by_side_on_this_machine_are_as_much_slower_as_measured():
    # Measured: two tasks at once each take 1.5x their time alone.
    crowded = dataclasses.replace(COMPUTE, crowding=((2, 1.5),))
    model = costmodel.Model(parameter_bytes=4)  # nothing to all-reduce worth counting
    here = costmodel.Cluster(2, 2, costmodel.Link(1e12, 0), cores=2)
    links = _links(costmodel.Link(1e12, 0))
    for mode in (
        lambda c, cl: costmodel.mirrored(model, c, 100, cl, 2),
        lambda c, cl: costmodel.multi_worker(model, c, 100, cl, links, "tcp"),
    ):
        alone, side = mode(COMPUTE, here), mode(crowded, here)
        assert side.parts["compute"] == pytest.approx(1.5 * alone.parts["compute"])
    # A local cluster's pipeline stages compute at once too.
    piped = [
        costmodel.model_parallel(model, c, 100, here, links, 2, 4, True).parts["slot"]
        for c in (COMPUTE, crowded)
    ]
    assert piped[1] == pytest.approx(1.5 * piped[0])
    assert crowded.crowded(1) == 1.0 and crowded.crowded(4) == 1.5  # the nearest measured
    # A local parameter server's workers compute side by side, as crowded, and
    # share the servers' measured traffic T: an update costs T + t x crowding / W.
    served = dataclasses.replace(links, local_ps={(2, 1): 2e-3})
    for c in (COMPUTE, crowded):
        ps = costmodel.parameter_server(model, c, 100, here, served, 1)
        assert ps.step_seconds == pytest.approx(2e-3 + c.seconds(100, 1) * c.crowded(2) / 2)
    # Workers on machines of their own do not crowd each other.
    apart = _cluster(2, costmodel.Link(1e12, 0))
    alone = costmodel.multi_worker(model, COMPUTE, 100, apart, links, "tcp")
    side = costmodel.multi_worker(model, crowded, 100, apart, links, "tcp")
    assert side.step_seconds == pytest.approx(alone.step_seconds)


def test_data_parallel_replicas_cost_what_their_measured_step_costs():
    # Measured: a replica's step through the strategy is 1.2x one_device's
    # alone and 2.2x side by side; independent tasks crowd each other 1.4x.
    both = dataclasses.replace(COMPUTE, crowding=((2, 1.4),), replicas=((1, 1.2), (2, 2.2)))
    model = costmodel.Model(parameter_bytes=4)
    here = costmodel.Cluster(2, 2, costmodel.Link(1e12, 0), cores=2)
    links = _links(costmodel.Link(1e12, 0))
    one = COMPUTE.seconds(50, 1)
    for p in (
        costmodel.mirrored(model, both, 100, here, 2),
        costmodel.multi_worker(model, both, 100, here, links, "tcp"),
    ):
        assert p.parts["compute"] == pytest.approx(2.2 * one)  # side by side: as measured
    # Workers on machines of their own (2 cores each): the replica's step alone.
    apart = costmodel.multi_worker(
        model, both, 100, _cluster(2, costmodel.Link(1e12, 0)), links, "tcp"
    )
    assert apart.parts["compute"] == pytest.approx(1.2 * COMPUTE.seconds(50, 2))
    # The parameter server's workers are not replicas of a synchronous step:
    # crowded as independent tasks.
    served = dataclasses.replace(links, local_ps={(2, 1): 2e-3})
    ps = costmodel.parameter_server(model, both, 100, here, served, 1)
    assert ps.parts["compute"] == pytest.approx(1.4 * COMPUTE.seconds(100, 1))
    # Only the replica alone measured: alone's cost, crowded as tasks are.
    alone_only = dataclasses.replace(both, replicas=((1, 1.2),))
    assert alone_only.replicated(2) == pytest.approx(1.2 * 1.4)
    assert alone_only.replicated(2, side_by_side=False) == pytest.approx(1.2)
    assert COMPUTE.replicated(4) == 1.0  # nothing measured: one_device's step


def test_a_plan_json_from_before_the_replica_probe_predicts_from_the_crowding():
    crowded = dataclasses.replace(COMPUTE, crowding=((2, 1.5),), pipeline_steps=((2, 4, 1e-3),))
    model = costmodel.Model(parameter_bytes=4000, stages={2: ((0.5, 0.5), (1024.0,))})
    ran = dataclasses.replace(_links(), local_ps={(2, 1): 2e-3}, local_ps_batch=1)
    # What this version measures beside them, gone from the document below.
    newer = dataclasses.replace(
        crowded, replicas=((1, 1.2), (2, 2.2)), pipeline_batches=((2, 4, 48, 3e-3),)
    )
    ran_newer = dataclasses.replace(
        ran,
        local_pipeline={(2, 4): ((4, 6e-3), (48, 9e-3))},
        local_ps_steps={(2, 1): ((1, 2e-3), (50, 9e-3))},
    )
    inputs = plan.inputs_document(newer, model, ran_newer, [2], {2: 4}, 1, None)
    # Written by earlier versions: no replica probe, the parameter server's
    # updates measured bare, no pipeline measured at a second batch.
    for part, key in (
        ("compute", "replicas"),
        ("compute", "pipeline_batches"),
        ("links", "local_ps_batch"),
        ("links", "local_pipeline"),
        ("links", "local_ps_steps"),
    ):
        del inputs[part][key]
    shown = plan.readable_inputs(inputs)
    assert shown["grpc"]["ps_updates_here_batch"] == 0
    assert shown["pipeline_step_seconds_at_batch"] == {}
    assert shown["pipeline_launched_here_seconds"] == {}
    assert shown["grpc"]["ps_updates_here_seconds_at_batch"] == {}
    document = {"inputs": inputs, "cores": 2, "global_batch": 100, "cluster": "local"}
    again = {p.mode: p for p in plan.predictions_of(document)}
    here = plan.parse_cluster("local", cores=2)
    assert again["mirrored x2"].step_seconds == pytest.approx(
        costmodel.mirrored(model, crowded, 100, here, 2).step_seconds
    )
    assert again["mirrored x2"].parts["compute"] == pytest.approx(1.5 * COMPUTE.seconds(50, 1))
    assert again["parameter_server 2 workers, 1 ps"].step_seconds == pytest.approx(
        costmodel.parameter_server(model, crowded, 100, here, ran, 1).step_seconds
    )
    # With the updates measured at two batches, the line through them.
    newer_ps = costmodel.parameter_server(model, newer, 100, here, ran_newer, 1)
    assert newer_ps.step_seconds == pytest.approx(2e-3 + 99 * 7e-3 / 49)
    # The pipelines from their parts and the one-example schedule alone.
    for processes in (False, True):
        p = costmodel.model_parallel(model, crowded, 100, here, ran, 2, 4, processes)
        assert again[p.mode].step_seconds == pytest.approx(p.step_seconds)
        newer_p = costmodel.model_parallel(model, newer, 100, here, ran_newer, 2, 4, processes)
        assert newer_p.step_seconds != pytest.approx(p.step_seconds)  # the keys mattered


def test_all_reduce_beats_one_parameter_server_for_a_dense_model_as_workers_grow():
    # A ResNet-50-sized dense model (25.6 M float32 parameters), 50 ms of compute a step.
    model = costmodel.Model(parameter_bytes=4 * 25_600_000)
    compute = costmodel.Compute(((8, 5e-3, 45e-3 / 256),))
    gaps = []
    for n in (2, 4, 8, 16, 32):
        cluster = costmodel.Cluster(n, 8, LAN, local=False)
        ring = costmodel.multi_worker(model, compute, 256 * n, cluster, _links(), "tcp")
        ps = costmodel.parameter_server(model, compute, 256, cluster, _links(), 1)
        gaps.append(ring.examples_per_second / ps.examples_per_second)
    assert gaps == sorted(gaps) and gaps[-1] > 2, gaps
    # One server's link bounds its updates a second: more workers add nothing.
    ps_rates = [
        costmodel.parameter_server(model, compute, 256, _cluster(n, cores=8), _links(), 1)
        for n in (16, 32)
    ]
    assert ps_rates[0].bound == "ps bandwidth"
    assert ps_rates[1].examples_per_second == pytest.approx(ps_rates[0].examples_per_second)


def test_sharded_parameter_servers_help_a_sparse_embedding_model():
    # 1 GB of embedding rows, of which a step touches 100 per example, and a
    # small dense part: the servers move rows, the ring would move the table.
    model = costmodel.Model(
        parameter_bytes=(250_000_000 + 100_000) * 4,
        embedding_bytes=250_000_000 * 4,
        sparse_bytes_per_example=100 * 64 * 4,
    )
    compute = costmodel.Compute(((8, 2e-3, 1e-5),))
    cluster = costmodel.Cluster(16, 8, LAN, local=False)
    rates = [
        costmodel.parameter_server(model, compute, 512, cluster, _links(), ps).examples_per_second
        for ps in (1, 2, 4, 8)
    ]
    assert rates == sorted(rates) and rates[-1] > 2 * rates[0], rates
    ring = costmodel.multi_worker(model, compute, 512 * 16, cluster, _links(), "tcp")
    assert rates[-1] > 5 * ring.examples_per_second


def test_the_pipeline_efficiency_rises_with_micro_batches_as_the_bubble_says():
    # No fixed cost and nothing crossing the cut: efficiency is M / (M + K - 1).
    compute = costmodel.Compute(((1, 0.0, 1e-4),))
    model = costmodel.Model(parameter_bytes=10**6, stages={2: ((0.5, 0.5), (0.0,))})
    cluster = costmodel.Cluster(2, 1, LAN, local=False)
    ideal = 512 / compute.seconds(512, 1) * 2  # two stages, no bubble
    for m in (1, 2, 4, 8, 16, 32):
        p = costmodel.model_parallel(model, compute, 512, cluster, _links(), 2, m, False)
        assert p.examples_per_second / ideal == pytest.approx(1 - costmodel.bubble_fraction(2, m))
        assert p.bound == "pipeline bubble"


def test_a_pipeline_waits_for_the_passes_across_its_cut_as_measured():
    compute = costmodel.Compute(((1, 0.0, 1e-4),))
    model = costmodel.Model(parameter_bytes=10**6, stages={2: ((0.5, 0.5), (4096.0,))})
    here = costmodel.Cluster(2, 1, costmodel.Link(1e12, 0), cores=2)

    def step(passes, cluster=here, m=4):
        links = dataclasses.replace(_links(), pipeline_passes=passes)
        return costmodel.model_parallel(
            model, compute, 512, cluster, links, 2, m, True
        ).step_seconds

    free = step({"launched": (0.0, 0.0)})
    # Each of the M+K-1 slots waits for the activations forward and their
    # gradients back; the step's fixed cost of the passes comes once.
    assert step({"launched": (1e-3, 2e-3)}) == pytest.approx(free + 5 * 2e-3 + 2e-3)
    assert step({"launched": (1e-3, 0.0)}, m=8) == pytest.approx(
        step({"launched": (0.0, 0.0)}, m=8) + 9 * 2e-3
    )
    # Machines joined by a slow network: a pass takes at least its bytes'
    # time on that network (128 examples x 4096 bytes at 1 MB/s).
    slow = costmodel.Cluster(2, 1, costmodel.Link(1e6, 0), local=False)
    assert step({"launched": (1e-3, 0.0)}, slow) == pytest.approx(
        step({"launched": (1e-3, 0.0)}) + 5 * 2 * (128 * 4096 / 1e6 - 1e-3)
    )


def test_stages_sharing_one_machines_cores_are_never_faster_than_one_device():
    # A schedule probe that read low (noise) cannot put the in-process
    # pipeline ahead of one device doing the same micro-batches.
    compute = dataclasses.replace(COMPUTE, microbatch=((2, 1e-6),), pipeline_steps=((2, 4, 1e-6),))
    model = costmodel.Model(parameter_bytes=10**6, stages={2: ((0.5, 0.5), (0.0,))})
    here = costmodel.Cluster(2, 2, costmodel.Link(1e12, 0), cores=2)
    one = costmodel.one_device(model, compute, 100, here)
    piped = costmodel.model_parallel(model, compute, 100, here, _links(), 2, 4, False)
    assert piped.examples_per_second <= one.examples_per_second * 1.0001


def test_the_in_process_pipeline_costs_an_example_what_its_measured_schedule_does():
    # Measured: the schedule's step is 1 ms at one example per micro-batch
    # (4) and 1.44 ms at batch 48: 10 us an example, twice one_device's.
    model = costmodel.Model(parameter_bytes=10**6, stages={2: ((0.5, 0.5), (0.0,))})
    here = costmodel.Cluster(2, 2, costmodel.Link(1e12, 0), cores=2)
    schedule = dataclasses.replace(COMPUTE, pipeline_steps=((2, 4, 1e-3),))
    fitted = dataclasses.replace(schedule, pipeline_batches=((2, 4, 48, 1.44e-3),))
    piped = costmodel.model_parallel(model, fitted, 100, here, _links(), 2, 4, False)
    assert piped.step_seconds == pytest.approx(1e-3 + 96 * 1e-5)
    # Without the larger batch: one_device's cost per example (5 us on 2 cores).
    bare = costmodel.model_parallel(model, schedule, 100, here, _links(), 2, 4, False)
    assert bare.step_seconds == pytest.approx(1e-3 + 96 * 5e-6)
    # Another schedule's figures do not apply.
    other = dataclasses.replace(schedule, pipeline_batches=((2, 8, 48, 1.44e-3),))
    again = costmodel.model_parallel(model, other, 100, here, _links(), 2, 4, False)
    assert again.step_seconds == pytest.approx(bare.step_seconds)
    # plan.json keeps them: made again, the same.
    inputs = plan.inputs_document(fitted, model, _links(), [2], {2: 4}, 1, None)
    document = {"inputs": inputs, "cores": 2, "global_batch": 100, "cluster": "local"}
    rows = {p.mode: p for p in plan.predictions_of(document)}
    assert rows[piped.mode].step_seconds == pytest.approx(piped.step_seconds)


def test_a_pipeline_launched_here_follows_its_steps_measured_at_two_batches():
    model = costmodel.Model(parameter_bytes=10**6, stages={2: ((0.5, 0.5), (1024.0,))})
    here = plan.parse_cluster("local", cores=2)
    # Measured: 6 ms a step at batch 4 (one example per micro-batch), 7.2 ms at 48.
    ran = dataclasses.replace(_links(), local_pipeline={(2, 4): ((4, 6e-3), (48, 7.2e-3))})
    launched = costmodel.model_parallel(model, COMPUTE, 100, here, ran, 2, 4, processes=True)
    assert launched.step_seconds == pytest.approx(6e-3 + 96 * (1.2e-3 / 44))
    # Other schedules, the stages in one process and a cluster of machines
    # are modelled from their parts, as without it.
    for args, cluster in (((2, 8, True), here), ((2, 4, False), here), ((2, 4, True), _cluster(2))):
        plain = costmodel.model_parallel(model, COMPUTE, 100, cluster, _links(), *args)
        other = costmodel.model_parallel(model, COMPUTE, 100, cluster, ran, *args)
        assert other.step_seconds == pytest.approx(plain.step_seconds)
    # plan.json keeps them: made again, the same.
    inputs = plan.inputs_document(COMPUTE, model, ran, [2], {2: 4}, 1, None)
    document = {"inputs": inputs, "cores": 2, "global_batch": 100, "cluster": "local"}
    rows = {p.mode: p for p in plan.predictions_of(document)}
    assert rows[launched.mode].step_seconds == pytest.approx(launched.step_seconds)


def test_a_parameter_server_launched_here_follows_its_updates_measured_at_two_batches():
    model = costmodel.Model(parameter_bytes=10**6)
    here = plan.parse_cluster("local", cores=2)
    # Measured: 4 ms an update at one example a step, 29 ms at batch 50.
    ran = dataclasses.replace(
        _links(), local_ps={(2, 1): 4e-3}, local_ps_steps={(2, 1): ((1, 4e-3), (50, 29e-3))}
    )
    p = costmodel.parameter_server(model, COMPUTE, 100, here, ran, 1)
    slope = 25e-3 / 49
    assert p.step_seconds == pytest.approx(4e-3 + 99 * slope)
    assert p.examples_per_second == pytest.approx(100 / p.step_seconds)
    # Parts as a worker's step (2 updates): what a batch adds, and the
    # line's height at batch 0 less the workers' own fixed cost (2 of them
    # at once, each on 1 core: 2e-4 / 2 an update).
    own = COMPUTE.seconds(0, 1) / 2
    assert p.parts["compute"] + p.parts["ps traffic"] == pytest.approx(2 * p.step_seconds)
    assert p.parts["ps traffic"] == pytest.approx(2 * (4e-3 - slope - own))
    # Traffic-bound below the batch it names, compute-bound from there.
    edge = p.communication_bound_below_batch
    assert edge == math.ceil((4e-3 - slope - 2 * own) / slope)
    assert p.bound == "compute"
    at = {
        b: costmodel.parameter_server(model, COMPUTE, b, here, ran, 1).bound
        for b in (edge - 1, edge)
    }
    assert at == {edge - 1: "ps traffic", edge: "compute"}
    # A larger batch measured no slower: noise, no line; the one-example rule.
    flat = dataclasses.replace(ran, local_ps_steps={(2, 1): ((1, 4e-3), (50, 3.9e-3))})
    rule = costmodel.parameter_server(model, COMPUTE, 100, here, flat, 1)
    assert rule.step_seconds == pytest.approx(4e-3 + COMPUTE.seconds(100, 1) / 2)
    # Another server count, or a cluster of machines: as without it.
    for ps, cluster in ((2, here), (1, _cluster(2))):
        plain = costmodel.parameter_server(model, COMPUTE, 100, cluster, _links(), ps)
        other = costmodel.parameter_server(model, COMPUTE, 100, cluster, ran, ps)
        assert other.step_seconds == pytest.approx(plain.step_seconds)
    # One batch measured: the rule from T and the compute (round six).
    one = dataclasses.replace(ran, local_ps_steps={(2, 1): ((1, 4e-3),)})
    alone = costmodel.parameter_server(model, COMPUTE, 100, here, one, 1)
    assert alone.step_seconds == pytest.approx(4e-3 + COMPUTE.seconds(100, 1) / 2)
    # plan.json keeps them: made again, the same.
    inputs = plan.inputs_document(COMPUTE, model, ran, [], {}, 1, None)
    document = {"inputs": inputs, "cores": 2, "global_batch": 100, "cluster": "local"}
    rows = {r.mode: r for r in plan.predictions_of(document)}
    assert rows[p.mode].step_seconds == pytest.approx(p.step_seconds)
    shown = plan.readable_inputs(inputs)["grpc"]["ps_updates_here_seconds_at_batch"]
    assert shown == {"2 workers, 1 ps, batch 1": 4e-3, "2 workers, 1 ps, batch 50": 29e-3}


def test_all_reduce_is_the_bound_below_the_batch_the_plan_names_and_compute_above():
    model = costmodel.Model(parameter_bytes=4 * 10_000_000)
    cluster = _cluster(8)
    first = costmodel.multi_worker(model, COMPUTE, 64, cluster, _links(), "tcp")
    edge = first.communication_bound_below_batch
    assert edge and edge > 64
    below = costmodel.multi_worker(model, COMPUTE, edge // 2, cluster, _links(), "tcp")
    above = costmodel.multi_worker(model, COMPUTE, edge * 2, cluster, _links(), "tcp")
    assert below.bound == "all-reduce" and above.bound == "compute"
    assert above.examples_per_second > below.examples_per_second
    # A faster network moves the edge down.
    fast = costmodel.Link(bandwidth=100e9 / 8, latency=5e-6)
    faster = costmodel.multi_worker(model, COMPUTE, 64, _cluster(8, fast), _links(fast), "tcp")
    assert faster.communication_bound_below_batch < edge


def test_the_input_pipeline_bounds_every_mode_it_is_slower_than():
    model = costmodel.Model(parameter_bytes=10**5)
    p = costmodel.one_device(model, COMPUTE, 256, _cluster(1), input_rate=1000.0)
    assert p.bound == "input" and p.examples_per_second == 1000.0


@pytest.mark.parametrize(
    "spec, workers, cores, bandwidth, latency",
    [
        ("4xcpu:16,25Gbit/s,20us", 4, 16, 25e9 / 8, 20e-6),
        ("8", 8, 2, 10e9 / 8, 50e-6),  # this machine's cores, the default network
        ("2xcpu:4,1.25GB/s,0.2ms", 2, 4, 1.25e9, 2e-4),
        ("3, 100Mbps", 3, 2, 100e6 / 8, 50e-6),
    ],
)
def test_cluster_specs(spec, workers, cores, bandwidth, latency):
    c = plan.parse_cluster(spec, cores=2)
    assert (c.workers, c.cores_per_task, c.local) == (workers, cores, False)
    assert c.network.bandwidth == pytest.approx(bandwidth)
    assert c.network.latency == pytest.approx(latency)
    assert plan.parse_cluster("local", cores=2).local


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--cluster=four"], "--cluster=four: expected 'local' or N[xcpu:C]"),
        (["--cluster=4xgpu"], "devices other than CPU cores, such as 'gpu'"),
        (["--cluster=0"], "expected at least 1 worker"),
        (["--cluster=4,0Gbit/s"], "bandwidth '0Gbit/s': expected more than zero"),
        (["--cluster=4,10Gbit/s,fast"], "latency 'fast': expected a number and a unit"),
        (["--cluster=4xcpu:2", "--measure"], "--measure runs the modes on this machine"),
        (["--output=/no/such/folder/plan.json"], "cannot write there"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(tmp_path, flags, said):
    result = run_tftrain(
        "plan",
        f"--output={tmp_path / 'plan.json'}",
        *flags,  # after: a case's own --output wins
        "--",
        "--experiment=fashion_mnist_mlp:smoke",
        check=False,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in lines[-1] and "Traceback" not in result.stderr, lines
    assert not os.path.exists(tmp_path / "plan.json")


def test_a_plan_without_a_run_to_plan_or_with_a_bad_training_flag_is_one_line(tmp_path):
    for train in ([], ["--experiment=fashion_mnist_mlp:smoke", "--batch_size=lots"]):
        result = run_tftrain("plan", "--", *train, check=False, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


SUBCLASSED = """
import keras, numpy as np, tensorflow as tf, tftrain

class Net(keras.Model):  # subclassed: no graph before it runs, nothing to cut
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(64, activation="relu")
        self.out = keras.layers.Dense(10)

    def call(self, x):
        return self.out(self.hidden(x))

class Mine(tftrain.Task):
    def build_model(self, config):
        return Net()

    def build_inputs(self, config, context, training):
        rng = np.random.default_rng(0)
        ds = tf.data.Dataset.from_tensor_slices(
            (rng.random((512, 32), np.float32), rng.integers(0, 10, 512)))
        return ds.batch(context.get_per_replica_batch_size(config.batch_size), drop_remainder=True)

    def build_loss(self, config):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

def get_config(variant=None):
    return tftrain.ExperimentConfig(task=Mine, batch_size=64, train_steps=100)
"""


@pytest.mark.slow
def test_a_plan_of_a_user_run_ranks_every_mode_and_writes_plan_json(tmp_path):
    # A user's subclassed model: its variables exist only once it is called,
    # and model_parallel cannot cut it (the plan says so, with no such row).
    experiment = tmp_path / "mine.py"
    experiment.write_text(SUBCLASSED)
    out, logdir = tmp_path / "plan.json", tmp_path / "curves"
    result = run_tftrain(
        "plan",
        "--probe_rounds=1",
        "--cluster=4xcpu:8,25Gbit/s,20us",
        f"--output={out}",
        f"--logdir={logdir}",
        "--",
        f"--experiment={experiment}",
        timeout=900,
    )
    document = json.loads(out.read_text())
    modes = document["modes"]
    names = [m["mode"] for m in modes]
    for wanted in (
        "one_device",
        "multi_worker_mirrored (tcp ring) x4",
        "parameter_server 4 workers, 1 ps",
    ):
        assert wanted in names, names
    assert not [n for n in names if n.startswith("model_parallel")], names
    assert "No model_parallel rows: " in result.stdout and "subclassed" in result.stdout
    speeds = [m["predicted_examples_per_second"] for m in modes]
    assert speeds == sorted(speeds, reverse=True) and all(s > 0 for s in speeds)
    for m in modes:
        assert {"mode", "flags", "predicted_examples_per_second", "bound"} <= set(m)
        assert m["bound"] in (
            "compute",
            "all-reduce",
            "ps bandwidth",
            "ps traffic",
            "pipeline bubble",
            "activations",
            "input",
        )
    best = modes[0]
    assert best["command"] in result.stdout  # the command to paste
    assert best["command"].startswith("tftrain ")
    measured = document["measured_inputs"]
    # 32x64 + 64 + 64x10 + 10 float32 parameters, counted once the model ran.
    assert measured["parameter_bytes"] == 4 * (32 * 64 + 64 + 64 * 10 + 10)
    assert measured["ring"]["bandwidth_bytes_per_second"] > 0
    # plan.json holds what the predictions were made from: made again, the same.
    again = plan.predictions_of(document)
    assert {p.mode: p.examples_per_second for p in again} == pytest.approx(
        {m["mode"]: m["predicted_examples_per_second"] for m in modes}
    )
    if len(os.sched_getaffinity(0)) >= 2:  # two tasks side by side: a measured factor
        assert measured["crowding"]["2"] > 0
        # A replica's step through the strategy, alone and side by side.
        assert set(measured["replica_step"]) == {"1", "2"}
        assert all(f > 0 for f in measured["replica_step"].values())
    # The scaling curves: one TensorBoard scalar per mode and axis.
    import tensorflow as tf

    tags = set()
    for name in os.listdir(logdir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            tags |= {v.tag for v in event.summary.value}
    assert any(t.startswith("workers/") for t in tags) and any(t.startswith("batch/") for t in tags)
    assert not math.isnan(best["predicted_step_seconds"])


@pytest.mark.slow
@pytest.mark.long  # about 8 minutes: every mode started for real, and the probes
def test_measure_runs_every_mode_here_and_records_what_it_measured(tmp_path):
    out = tmp_path / "plan.json"
    result = run_tftrain(
        "plan",
        "--measure",
        "--measure_secs=1",
        "--probe_rounds=2",
        "--max_ps=1",
        f"--output={out}",
        "--",
        "--experiment=fashion_mnist_mlp:smoke",
        timeout=1200,
    )
    document = json.loads(out.read_text())
    modes = document["modes"]
    assert len(modes) == 7, [m["mode"] for m in modes]
    # The parameter server's updates, measured by running the mode at batch 1.
    measured = document["measured_inputs"]
    assert measured["grpc"]["ps_updates_here_batch"] == 1
    assert measured["grpc"]["ps_updates_here_seconds"]["2 workers, 1 ps"] > 0
    # And at about half the global batch, the line's second point.
    at = measured["grpc"]["ps_updates_here_seconds_at_batch"]
    assert len(at) == 2 and all(t > 0 for t in at.values()), at
    # And the pipeline launched here, at two batches.
    assert len(measured["pipeline_launched_here_seconds"]) == 2
    assert all(t > 0 for t in measured["pipeline_launched_here_seconds"].values())
    for m in modes:
        assert m["measured_examples_per_second"] and m["measured_examples_per_second"] > 0, m
        assert m["mode"] in result.stdout
    assert "Fastest measured: " in result.stdout


def test_each_probe_figure_is_the_median_of_its_rounds(monkeypatch):
    # Three runs of a probe, one of them off: every figure is its median,
    # what is measured once (the profile) comes from the first run alone.
    runs = iter(
        [
            {"steps_per_second": {"64": 10.0}, "model": {"shapes": [[2, 3]]}, "peak": 5},
            {"steps_per_second": {"64": 30.0}, "peak": 7},
            {"steps_per_second": {"64": 12.0}, "peak": 6},
        ]
    )
    asked = []

    def probe(kind, request, timeout=1800, env=None):
        asked.append(request)
        return next(runs)

    monkeypatch.setattr(plan, "_probe", probe)
    got = plan._probe_rounds("compute", {"batches": [64], "profile": True}, 3)
    assert got == {"steps_per_second": {"64": 12.0}, "model": {"shapes": [[2, 3]]}, "peak": 6}
    assert [r.get("profile") for r in asked] == [True, None, None]


def test_a_model_that_cannot_be_cut_gets_no_pipeline_rows():
    cut = costmodel.Model(parameter_bytes=10**6, stages={2: ((0.5, 0.5), (4096.0,))})
    uncut = dataclasses.replace(cut, stages={})
    cluster = plan.parse_cluster("local", cores=2)

    def modes(model):
        rows = plan.predictions(model, COMPUTE, 256, cluster, _links(), 1, [2], {2: 4})
        return [r.mode for r in rows]

    assert sum(m.startswith("model_parallel") for m in modes(cut)) == 2
    assert not [m for m in modes(uncut) if m.startswith("model_parallel")]
    assert "one_device" in modes(uncut)


@pytest.mark.slow
def test_tasks_measured_side_by_side_wait_for_each_other_after_tracing_not_in_the_timing(
    monkeypatch, tmp_path
):
    """The side-by-side probe's barrier sits in the timed run, after its first
    stretch (which builds and traces), so the tasks' timed steps overlap
    whatever each took to trace; the wait itself is not timed."""
    import time

    from tftrain import plan_probe
    from tftrain.distribute import launch

    config = launch.config_of_train_argv(
        ["--experiment=fashion_mnist_mlp:smoke", f"--model_dir={tmp_path}"]
    )
    steps = []
    called = plan_probe._Once.__call__

    def wait():
        time.sleep(3.0)

    def at(self, output):
        if self.call is wait:
            steps.append((self.interval, output.step, output.total_steps))
        called(self, output)

    monkeypatch.setattr(plan_probe._Once, "__call__", at)
    waited = plan_probe._steps_per_second(config, 32, 1.0, ready=wait)
    alone = plan_probe._steps_per_second(config, 32, 1.0)
    # Once, after the first loop of the timed run (the longer of its two runs).
    [(loop, step, total)] = steps
    assert step == loop > 0 and total > 4
    # 3 s of waiting inside a timed stretch of about 1 s would cut the rate
    # several times over.
    assert waited > 0.5 * alone


def test_two_tasks_in_lockstep_meet_after_every_step(tmp_path):
    """benchmarks.crowding --lockstep: each step ends when both tasks have
    finished it; a task that leaves early is an error, not a hang."""
    import threading
    import time

    from tftrain import plan_probe

    meets = [plan_probe._Meet(str(tmp_path), rank, 2) for rank in range(2)]
    starts = [threading.Thread(target=m.begin, args=(0,)) for m in meets]
    for t in starts:
        t.start()
    for t in starts:
        t.join(30)
        assert not t.is_alive()

    def steps(meet, pause):
        for _ in range(5):
            time.sleep(pause)
            meet(None)

    both = [threading.Thread(target=steps, args=(m, p)) for m, p in zip(meets, (0.0, 0.05))]
    for t in both:
        t.start()
    for t in both:
        t.join(30)
        assert not t.is_alive()
    # The task without a pause waited for the other at every step.
    assert len(meets[0].times) == 5 and meets[0].steps_per_second() < 1 / 0.04
    meets[1].close()
    with pytest.raises(RuntimeError, match="left early"):
        meets[0](None)
    meets[0].close()
    # Alone: no one to meet, the same calls timed.
    alone = plan_probe._Meet()
    alone.begin(0)
    for _ in range(3):
        time.sleep(0.02)
        alone(None)
    assert alone.peer is None and alone.steps_per_second() < 1 / 0.015
    with pytest.raises(ValueError, match="expected 2"):
        plan_probe._Meet(str(tmp_path), 0, 3)


def test_each_side_by_side_barrier_is_a_meeting_of_its_own(tmp_path):
    """A second barrier in the same folder (a request of two batches) waits
    for the other task again, not for the first barrier's files."""
    import threading

    from tftrain import plan_probe

    ready = [plan_probe._barrier(str(tmp_path), rank, 2, timeout=5) for rank in range(2)]
    both = [threading.Thread(target=r) for r in ready]
    for t in both:
        t.start()
    for t in both:
        t.join(10)
        assert not t.is_alive()
    lonely = plan_probe._barrier(str(tmp_path), 0, 2, timeout=0.5)
    lonely()  # the first meeting, already held: its files are there
    with pytest.raises(RuntimeError, match="never got ready"):
        lonely()  # the second: the other task never comes


def test_a_failed_half_batch_parameter_server_probe_keeps_the_one_example_probe(monkeypatch):
    # An experiment that cannot run at half its batch, say: the one-example
    # probe is kept (the round-six rule), and one line says why.
    def launched(name, flags, launch, argv, config, batch, guess, log, rounds):
        if batch > plan.PS_PROBE_BATCH:
            raise RuntimeError(f"the probe of {name} at batch {batch} failed")
        return 4e-3

    monkeypatch.setattr(plan, "measure_launched", launched)
    lines = []
    config = type("Config", (), {"batch_size": 100})()
    got = plan.measure_ps_updates([], config, COMPUTE, 2, 1, 1e-3, lines.append)
    assert got == ((1, 4e-3),)
    assert len(lines) == 1 and "at batch 50" in lines[0] and "one-example rule" in lines[0]


def test_the_parameter_server_is_launched_at_one_example_and_at_half_the_batch(monkeypatch):
    asked = []

    def launched(name, flags, launch, argv, config, batch, guess, log, rounds):
        asked.append((batch, launch, flags, guess, rounds))
        return 1e-3 * batch

    monkeypatch.setattr(plan, "measure_launched", launched)
    config = type("Config", (), {"batch_size": 100})()
    got = plan.measure_ps_updates([], config, COMPUTE, 2, 2, 3e-3, print, rounds=3)
    assert got == ((1, 1e-3), (50, 5e-2))
    for batch, launch, flags, guess, rounds in asked:
        assert launch == {"num_workers": 2, "num_ps": 2}
        assert flags == ["--strategy=parameter_server"] and rounds == 3
        # Sized from the step's compute (2 workers at once, 1 core each) and
        # the update measured over gRPC.
        assert guess == pytest.approx(COMPUTE.seconds(batch, 1) / 2 + 3e-3)


def test_a_launched_pipeline_failing_at_its_larger_batch_keeps_the_first_and_says_so(
    monkeypatch,
):
    def launched(name, flags, launch, argv, config, batch, guess, log, rounds):
        if batch > 4:
            raise RuntimeError(f"the probe of {name} at batch {batch} failed")
        return 2e-3

    monkeypatch.setattr(plan, "measure_launched", launched)
    lines = []
    config = type("Config", (), {"batch_size": 100})()
    got = plan.measure_launched_pipeline([], config, COMPUTE, 2, 4, lines.append)
    assert got == ((4, 2e-3),)
    assert len(lines) == 1 and "at batch 48" in lines[0] and "from its parts" in lines[0]
    # One point draws no line: the pipeline is modelled from its parts.
    assert not costmodel._two_batches(got)
    # A failure at the first batch is the caller's to report.
    monkeypatch.setattr(plan, "measure_launched", lambda *a: (_ for _ in ()).throw(RuntimeError))
    with pytest.raises(RuntimeError):
        plan.measure_launched_pipeline([], config, COMPUTE, 2, 4, lines.append)


def _descendants(pid: int) -> dict:
    """{pid: (start time, command line)} of every live process below ``pid``."""
    stats = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        if fields := proc_stat(entry):
            stats[int(entry)] = (int(fields[1]), fields[19])
    below, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, started) in stats.items():
            if ppid == parent and child not in below:
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        below[child] = (started, f.read().replace(b"\0", b" ").decode())
                except OSError:
                    continue
                frontier.append(child)
    return below


def _launched(below: dict) -> list:
    return [p for p, (_, command) in below.items() if "tftrain launch" in command]


@pytest.mark.slow
@pytest.mark.cluster
def test_a_plan_stopped_by_sigterm_stops_the_run_it_launched(tmp_path):
    """Stopped while a probe of the parameter server is launched, the plan
    takes the launcher and its tasks down with it, then exits 143."""
    import time

    from tests.conftest import start_tftrain

    experiment = tmp_path / "mine.py"
    experiment.write_text(SUBCLASSED)
    proc = start_tftrain(
        "plan",
        "--probe_rounds=1",
        f"--output={tmp_path / 'plan.json'}",
        "--",
        f"--experiment={experiment}",
    )
    try:
        below, deadline = {}, time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            below = _descendants(proc.pid)
            launched = _launched(below)
            # The launcher and, below it, its tasks.
            if launched and any(_descendants(p) for p in launched):
                break
            time.sleep(0.5)
        assert _launched(below), below
        below = _descendants(proc.pid)
        assert all(_alive(p, below[p][0]) for p in _launched(below)), below
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == "tftrain plan: stopped by SIGTERM; no plan printed."
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_alive(p, s) for p, (s, _) in below.items()):
            time.sleep(0.5)
        left = {p: c for p, (s, c) in below.items() if _alive(p, s)}
        assert not left, left
        assert not (tmp_path / "plan.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stopping_the_children_asks_first_then_kills_what_stays():
    import sys

    polite = plan._popen(["sleep", "60"])
    stubborn = plan._popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stubborn.stdout.readline() == "ready\n"
    plan.stop_children(grace=2)
    assert polite.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL


def test_a_probe_past_its_time_is_asked_to_stop_before_it_is_killed():
    import sys

    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('saving', flush=True), sys.exit(143)))\n"
        "time.sleep(60)"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        plan._run([sys.executable, "-c", code], timeout=3, env=dict(os.environ))
    assert [p.returncode for p in plan._children][-1:] == [143]

"""SIGKILL `tftrain launch` (alone or with one of its tasks) at random moments
and check that no process of its cluster outlives it.

    python scripts/soak_launcher_kill.py [--tries=10] [--seed=0] [--modes=...]

For each mode (multi_worker_mirrored, parameter_server, model_parallel) and
each try: a 2-worker cluster (plus one parameter server) of
``fashion_mnist_mlp:smoke`` starts a long run with
``--collective_timeout_secs=20``; after a random delay (0-20 s from the
launch: start-up, the first evaluation and training are all hit) the
launcher is SIGKILLed, and in half of the tries one of its tasks with it.
Every descendant of the launcher seen up to the kill (tasks and their
watchdogs), and every process whose command line names the run's folder,
must be gone within --collective_timeout_secs + 10 s. Prints one line a
try and a table; exits 1 if any process was left.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TIMEOUT = 20  # --collective_timeout_secs of the runs
BOUND = TIMEOUT + 10
MODES = {
    "multi_worker_mirrored": ["--num_workers=2"],
    "parameter_server": ["--num_workers=2", "--num_ps=1"],
    "model_parallel": ["--num_workers=2"],
}


def _processes() -> dict[int, tuple[int, str]]:
    """pid: (parent pid, command line) of every process now."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        table[int(name)] = (parent, command)
    return table


def _cluster(launcher: int, model_dir: str) -> set[int]:
    """The launcher's descendants and every process naming ``model_dir``."""
    table = _processes()
    found = {pid for pid, (_, command) in table.items() if model_dir in command}
    found.add(launcher)
    grew = True
    while grew:
        more = {pid for pid, (parent, _) in table.items() if parent in found}
        grew = not more <= found
        found |= more
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def one_try(mode: str, delay: float, with_task: bool, rng: random.Random, root: str) -> dict:
    model_dir = os.path.join(root, f"run-{mode}-{time.monotonic_ns()}")
    command = [
        sys.executable,
        "-m",
        "tftrain",
        "launch",
        *MODES[mode],
        "--",
        "--experiment=fashion_mnist_mlp:smoke",
        f"--strategy={mode}",
        f"--model_dir={model_dir}",
        f"--collective_timeout_secs={TIMEOUT}",
        "--train_steps=1000000",
        "--steps_per_loop=10",
        "--checkpoint_interval=500",
        "--log_interval_secs=1",
    ]
    log = open(model_dir + ".log", "w")
    launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    start = time.monotonic()
    while time.monotonic() - start < delay and launcher.poll() is None:
        seen |= _cluster(launcher.pid, model_dir)
        time.sleep(0.1)
    seen |= _cluster(launcher.pid, model_dir)
    tasks = sorted(
        p
        for p in seen
        if p != launcher.pid and "-m tftrain train" in _processes().get(p, (0, ""))[1]
    )
    victim = rng.choice(tasks) if with_task and tasks else None
    launcher.send_signal(signal.SIGKILL)
    if victim:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = time.monotonic()
    launcher.wait()
    seen |= {p for p in _cluster(launcher.pid, model_dir) if p != launcher.pid}
    left = {p for p in seen if _alive(p)}
    while left and time.monotonic() - killed < BOUND:
        time.sleep(0.2)
        seen |= {p for p in _cluster(launcher.pid, model_dir) if p != launcher.pid}
        left = {p for p in seen if _alive(p)}
    gone_after = time.monotonic() - killed
    for pid in left:  # clean up before the next try
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log.close()
    return {
        "mode": mode,
        "delay": delay,
        "with_task": victim is not None,
        "tasks_seen": len(tasks),
        "processes": len(seen),
        "left": sorted(left),
        "seconds": gone_after,
        "log": model_dir + ".log",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders and logs")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="tftrain-soak-")
    results = []
    try:
        for mode in args.modes.split(","):
            for n in range(args.tries):
                delay, with_task = rng.uniform(0, 20), n % 2 == 1
                r = one_try(mode, delay, with_task, rng, root)
                results.append(r)
                print(
                    f"{mode:22} try {n + 1:2}: killed at {r['delay']:4.1f} s "
                    f"{'with a task' if r['with_task'] else 'alone      '} "
                    f"({r['tasks_seen']} task(s), {r['processes']} processes): "
                    + (
                        f"all gone in {r['seconds']:.1f} s"
                        if not r["left"]
                        else f"LEFT {r['left']}"
                    ),
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n| mode | tries | with a task | all gone within {BOUND} s | slowest |")
    print("| --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        rows = [r for r in results if r["mode"] == mode]
        clean = [r for r in rows if not r["left"]]
        slowest = max((r["seconds"] for r in clean), default=float("nan"))
        print(
            f"| {mode} | {len(rows)} | {sum(r['with_task'] for r in rows)} | "
            f"{len(clean)} of {len(rows)} | {slowest:.1f} s |"
        )
    return 0 if all(not r["left"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

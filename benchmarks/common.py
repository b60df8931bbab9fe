"""What the benchmarks share: running a process as a user would and reading
its peak resident memory (``ru_maxrss`` of that process, from ``wait4``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_measured(argv: list[str], env: dict | None = None) -> tuple[str, float]:
    """Runs ``argv`` (from the repository root; ``env`` on top of this
    process's environment); returns its stdout and its peak RSS in MiB.
    Exits with its stderr if it fails."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    env.pop("TF_CONFIG", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status):
            errors.seek(0)
            said = errors.read().decode(errors="replace")
            raise SystemExit(f"{' '.join(argv)} failed:\n{said[-4000:]}")
        out.seek(0)
        return out.read().decode(), usage.ru_maxrss / 1024


def run(command: list[str], model_dir: str, env: dict | None = None) -> tuple[dict, float]:
    """Runs ``tftrain COMMAND``; returns its metrics.json and its peak RSS in MiB."""
    _, rss = run_measured([sys.executable, "-m", "tftrain", *command], env)
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f), rss

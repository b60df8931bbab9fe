"""A plan's predictions against speeds measured in another run.

``tftrain plan --measure`` runs every mode in the same command as the
probes; this puts the predictions a plan.json's measured inputs give with
this version's cost model beside the measured speeds of another plan.json
(the same experiment and batch), so a change to the model can be checked
against runs already made without running every mode again:

    .venv/bin/python -m benchmarks.plan_check PROBES.json MEASURED.json
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    from tftrain import plan

    if len(argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    with open(argv[1]) as f:
        probes = json.load(f)
    with open(argv[2]) as f:
        measured = json.load(f)
    for key in ("experiment", "global_batch"):
        if probes.get(key) != measured.get(key):
            sys.exit(f"{key}: {probes.get(key)!r} in {argv[1]}, {measured.get(key)!r} in {argv[2]}")
    rows = plan.predictions_of(probes, "local")
    speeds = {
        m["mode"]: m["measured_examples_per_second"]
        for m in measured["modes"]
        if m.get("measured_examples_per_second")
    }
    print(plan.table(rows, speeds))
    within = [
        r
        for r in rows
        if r.mode in speeds and abs(r.examples_per_second / speeds[r.mode] - 1) <= 0.25
    ]
    fastest = max(speeds, key=speeds.get)
    print(
        f"\n{len(within)} of {len(speeds)} measured modes within 25% of the prediction; ranked "
        f"first: {rows[0].mode} ({speeds.get(rows[0].mode, 0):,.0f} measured), fastest measured: "
        f"{fastest} ({speeds[fastest]:,.0f})."
    )


if __name__ == "__main__":
    main(sys.argv)

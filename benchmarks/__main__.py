"""``python -m benchmarks``: the race of tftrain against Keras fit and the
hardware (benchmarks/race.py); the other benchmarks run as modules
(``python -m benchmarks.scaling``, ``.pipeline``, ``.allreduce``,
``.optimizer_step``)."""

from benchmarks.race import main

main()

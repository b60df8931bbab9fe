"""TensorBoard summaries: one writer per run folder (``train``, ``eval``).

Only the chief writes; other tasks get writers that drop everything.
"""

from __future__ import annotations

import tensorflow as tf


class Summaries:
    def __init__(self, out, is_chief: bool):
        self._writers = {}
        self._out, self._is_chief = out, is_chief

    def _writer(self, run: str):
        if run not in self._writers:
            self._writers[run] = (
                tf.summary.create_file_writer(self._out.path(run))
                if self._is_chief
                else tf.summary.create_noop_writer()
            )
        return self._writers[run]

    def scalars(self, run: str, step: int, values: dict[str, float]) -> None:
        writer = self._writer(run)
        with writer.as_default(step=step):
            for tag, value in values.items():
                tf.summary.scalar(tag, value)

    def histograms(self, run: str, step: int, values: dict) -> None:
        writer = self._writer(run)
        with writer.as_default(step=step):
            for tag, data in values.items():
                tf.summary.histogram(tag, data, buckets=min(max(len(set(data)), 1), 64))

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

"""TensorBoard summaries: one writer per run folder (``train``, ``eval``;
``.`` is the run's own folder, where its hyperparameters go).

Only the chief writes; other tasks get writers that drop everything.
"""

from __future__ import annotations

import tensorflow as tf


def hparams_of(config, **extra) -> dict:
    """The run's flags as HParams values (bool, int, float or str): lists as
    comma-separated strings; unset (None) flags left out; the user's options
    beside the fields, by their own names."""
    values = {}
    for name, value in config.to_dict().items():
        if value is None or name in ("model_dir", "data_dir", "options", "experiment_source"):
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        values[name] = value
    for name, value in config.options.items():
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        if isinstance(value, (bool, int, float, str)):
            values[name] = value
    values.update(extra)
    return values


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

    def histograms(self, run: str, step: int, values: dict, buckets: int = 64) -> None:
        """``values``: tag -> array. Integer data (counts) get a bucket per value."""
        writer = self._writer(run)
        with writer.as_default(step=step):
            for tag, data in values.items():
                if getattr(data, "dtype", None) is not None and data.dtype.kind in "iu":
                    n = min(max(len(set(data.tolist())), 1), buckets)
                else:
                    n = buckets
                tf.summary.histogram(tag, data, buckets=n)

    def graph(self, run: str, graph) -> None:
        """A ``tf.Graph`` for TensorBoard's Graphs tab."""
        with self._writer(run).as_default(step=0):
            tf.summary.graph(graph)

    def hparams(self, values: dict) -> None:
        """The run's hyperparameters, in its own folder: TensorBoard's HParams
        dashboard shows one row per run with the final value of each of its
        scalars (eval/accuracy, eval/loss, ...)."""
        if not self._is_chief:
            return
        from tensorboard.plugins.hparams import api as hp

        with self._writer(".").as_default(step=0):
            hp.hparams(values)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

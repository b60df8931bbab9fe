"""Registries: every list of choices tftrain offers, written once.

A registry maps a name (a flag value) to the object that implements it,
given as ``"module:attribute"`` and imported only when used, so the names
are known (for flag help and validation) without importing TensorFlow.
Adding a strategy, model, optimizer or task is a module plus one line here,
or a call to :meth:`Registry.register` from user code.
"""

from __future__ import annotations

import importlib
from typing import Any

from tftrain.errors import ConfigError


class Registry:
    """Names of one kind of plug-in, and the objects behind them."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries: dict[str, Any] = dict(entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def register(self, name: str, target: Any) -> None:
        """Adds (or replaces) ``name``: an object, or a ``"module:attribute"`` path."""
        self._entries[name] = target

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        """The object behind ``name``.

        Raises:
          ConfigError: for a name that is not registered.
        """
        if name not in self._entries:
            raise ConfigError(f"--{self.kind}={name}: expected one of {', '.join(self.names())}.")
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attribute = target.partition(":")
            target = getattr(importlib.import_module(module), attribute)
            self._entries[name] = target
        return target


STRATEGIES = Registry(
    "strategy",
    {
        "one_device": "tftrain.distribute.one_device:OneDevice",
        "mirrored": "tftrain.distribute.mirrored:Mirrored",
        "multi_worker_mirrored": "tftrain.distribute.multi_worker:MultiWorkerMirrored",
        "parameter_server": "tftrain.distribute.parameter_server:ParameterServer",
        "model_parallel": "tftrain.distribute.model_parallel:ModelParallel",
    },
)
MODELS = Registry(
    "model",
    {
        "softmax": "tftrain.models:softmax",
        "mlp": "tftrain.models:mlp",
        "cnn": "tftrain.models:cnn",
        "embedding_bag": "tftrain.models:embedding_bag",
    },
)
OPTIMIZERS = Registry(
    "optimizer",
    {
        "sgd": "tftrain.optimizers.sgd:plain_sgd",
        "momentum": "tftrain.optimizers.sgd:momentum_sgd",
        "adagrad": "tftrain.optimizers.adagrad:Adagrad",
        "adam": "tftrain.optimizers.adam:Adam",
    },
)
TASKS = Registry("task", {"classification": "tftrain.tasks:Classification"})

"""Spark class name -> native stage implementation.

Stage modules register their classes with ``@register(...)``; ``build_stage`` imports
them all once, then looks a saved stage's class up and builds it, or raises
``UnsupportedStage`` so the caller can fall back to real Spark.
"""

from __future__ import annotations

import importlib

from runtimes.spark.native.base import Stage, StageMeta, UnsupportedStage

_STAGE_MODULES = ("numeric", "categorical", "text", "linear", "trees", "naive_bayes")
_REGISTRY: dict[str, type[Stage]] = {}
_loaded = False


def register(*spark_classes: str):
    """Class decorator: this implementation serves these Spark classes."""

    def wrap(cls: type[Stage]) -> type[Stage]:
        cls.spark_classes = tuple(spark_classes)
        for name in spark_classes:
            _REGISTRY[name] = cls
        return cls

    return wrap


def _load_modules() -> None:
    global _loaded
    if not _loaded:
        for name in _STAGE_MODULES:
            importlib.import_module(f"runtimes.spark.native.{name}")
        _loaded = True


def supported_classes() -> list[str]:
    _load_modules()
    return sorted(_REGISTRY)


def build_stage(meta: StageMeta) -> Stage:
    _load_modules()
    cls = _REGISTRY.get(meta.class_name)
    if cls is None:
        raise UnsupportedStage(f"{meta.short_name} ({meta.uid}): no native implementation")
    return cls(meta)

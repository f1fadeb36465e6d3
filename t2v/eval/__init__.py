"""Evaluation: retrieval metrics, similarity, Frechet distance, temporal metrics, scorers."""

import importlib

_LAZY = {
    "retrieval_metrics": "t2v.eval.retrieval",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 't2v.eval' has no attribute {name!r}")

"""Evaluation: retrieval metrics, similarity, Frechet distance, temporal metrics, scorers."""

import importlib

_LAZY = {
    "retrieval_metrics": "t2v.eval.retrieval",
    "clipsim": "t2v.eval.similarity",
    "r_precision": "t2v.eval.similarity",
    "frechet_distance": "t2v.eval.frechet",
    "temporal_flicker": "t2v.eval.temporal",
    "motion_smoothness": "t2v.eval.temporal",
    "dynamic_degree": "t2v.eval.temporal",
    "CLIPScorer": "t2v.eval.scorers",
    "XCLIPScorer": "t2v.eval.scorers",
    "load_scorer": "t2v.eval.scorers",
    "VideoTextRetriever": "t2v.eval.retriever",
    "attribute_accuracy": "t2v.eval.shapes_readback",
    "read_back": "t2v.eval.shapes_readback",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 't2v.eval' has no attribute {name!r}")

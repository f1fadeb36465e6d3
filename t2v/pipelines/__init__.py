"""Diffusers pipelines of t2v."""

from t2v.pipelines.pipeline_t2v import T2VPipeline, T2VPipelineOutput

__all__ = ["T2VPipeline", "T2VPipelineOutput"]

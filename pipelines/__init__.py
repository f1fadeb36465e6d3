"""`from pipelines import T2VPipeline`, the import the project has documented since its first release.

The pipeline lives in `t2v.pipelines`; this package only re-exports it so code written against the
documented import keeps working. New code should import from `t2v.pipelines` (or `t2v`).
"""

from t2v.pipelines import T2VPipeline, T2VPipelineOutput

__all__ = ["T2VPipeline", "T2VPipelineOutput"]

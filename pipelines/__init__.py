"""`from pipelines import T2VPipeline`, the import the project has documented since its first release.

The pipeline lives in `t2v.pipelines`; this package only re-exports it, so the import users write keeps
working. Inside the library, modules import `t2v.pipelines` (tests/test_architecture.py checks it).
"""

from t2v.pipelines import T2VPipeline, T2VPipelineOutput

__all__ = ["T2VPipeline", "T2VPipelineOutput"]

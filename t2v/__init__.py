"""t2v: text-to-video diffusion with a causal 3D VAE and a spatial-temporal DiT."""

import importlib
import os

__version__ = "0.1.0"

# Folder of the diffusers pipeline that generate.py loads when no --model is given.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default_model")

_LAZY = {
    "CausalVideoVAE": "t2v.models",
    "VideoDiT": "t2v.models",
    "TextEmbedder": "t2v.models",
    "T2VPipeline": "t2v.pipelines",
}


def __getattr__(name):
    # Lazy exports keep `import t2v` cheap and let diffusers resolve components by attribute.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 't2v' has no attribute {name!r}")

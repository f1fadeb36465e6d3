"""Model components: the causal video VAE, the video DiT and the text encoder wrapper."""

import importlib

_LAZY = {
    "CausalVideoVAE": "t2v.models.vae",
    "VideoDiT": "t2v.models.dit",
    "TextEmbedder": "t2v.models.text_encoder",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 't2v.models' has no attribute {name!r}")

"""Wan 2.1 text-to-video pipeline folders (diffusers' `WanPipeline`) as T2VPipeline, and back.

A WanPipeline folder loads as a T2VPipeline whose transformer is converted to a VideoDiT as it loads
(`t2v.models.wan`, exact); the VAE (`AutoencoderKLWan`), the umT5 text encoder with its tokenizer and the
scheduler (`UniPCMultistepScheduler` on flow sigmas) are used as they are. Generation defaults are
WanPipeline's own call defaults (81 frames of 480 x 832, 50 steps, guidance 5.0, prompts read to 512
tokens) and the 16 fps Wan 2.1 writes its samples at. Prompts are fed as Wan feeds them: the transformer's
`mask_text_padding=False` makes T2VPipeline keep every padded token, zero past each prompt's end.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from diffusers import AutoencoderKLWan, WanPipeline

from t2v.models.wan import WAN_CLASS, WAN_DEFAULTS, transformer_from_wan, transformer_to_wan

WAN_CALL_DEFAULTS = {
    name: p.default for name, p in inspect.signature(WanPipeline.__call__).parameters.items() if name != "self"
}
WAN_FPS = 16  # `sample_fps` of Wan 2.1's configs: the frame rate its videos are written at
WAN_GENERATION_DEFAULTS = {
    **{name: WAN_CALL_DEFAULTS[name] for name in ("num_frames", "height", "width", "num_inference_steps",
                                                   "guidance_scale")},
    "fps": WAN_FPS,
}  # fmt: skip
WAN_MAX_SEQUENCE_LENGTH = WAN_CALL_DEFAULTS["max_sequence_length"]


def is_wan_pipeline_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a local diffusers pipeline folder whose transformer is a `WanTransformer3DModel`."""
    return _model_index(path).get("transformer", [None, None])[1] == WAN_CLASS


def _model_index(path: str | os.PathLike) -> dict:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index) as f:
        return json.load(f)


def wan_pipeline_kwargs(path: str | os.PathLike, kwargs: dict) -> dict:
    """`from_pretrained` keyword arguments that load the WanPipeline folder `path` as a T2VPipeline: `kwargs`
    plus the converted transformer (in the dtype asked for it, else as stored), Wan's prompt length and
    generation defaults, each unless `kwargs` gives it. Two-stage (Wan 2.2) folders are refused."""
    index = _model_index(path)
    two_stage = {key: index[key] for key in ("boundary_ratio", "expand_timesteps") if index.get(key)}
    if index.get("transformer_2", [None, None])[0] is not None:
        two_stage["transformer_2"] = index["transformer_2"]
    if two_stage:
        raise ValueError(f"{os.fspath(path)!r} is a two-stage Wan 2.2 pipeline ({two_stage}); only Wan 2.1 "
                         "text-to-video converts")
    kwargs = dict(kwargs)
    if "transformer" not in kwargs:
        kwargs["transformer"] = transformer_from_wan(path, component_dtype(kwargs, "transformer"))
    kwargs.setdefault("max_sequence_length", WAN_MAX_SEQUENCE_LENGTH)
    kwargs.setdefault("generation_defaults", WAN_GENERATION_DEFAULTS)
    return kwargs


def component_dtype(kwargs: dict, name: str) -> torch.dtype | None:
    """The dtype `from_pretrained(**kwargs)` loads component `name` in, as diffusers reads `dtype` (or the
    older `torch_dtype`): one dtype for all, or {name: dtype, "default": dtype}; None when not given."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, dict):
        return dtype.get(name, dtype.get("default", torch.float32))
    return dtype


def pipeline_to_wan(pipe, rope_max_seq_len: int = WAN_DEFAULTS["rope_max_seq_len"]) -> WanPipeline:
    """A `WanPipeline` of a T2VPipeline whose transformer Wan can express, sharing its VAE, text encoder,
    tokenizer and scheduler. Its generation defaults are not carried over: WanPipeline has its own."""
    missing = [name for name in ("transformer", "vae", "text_encoder", "tokenizer") if getattr(pipe, name) is None]
    if missing:
        raise ValueError(f"a WanPipeline needs a transformer, VAE, text encoder and tokenizer; this pipeline has no "
                         f"{', '.join(missing)}")
    if not isinstance(pipe.vae, AutoencoderKLWan):
        raise ValueError(f"a WanPipeline decodes with an AutoencoderKLWan, not a {type(pipe.vae).__name__}")
    if pipe.text_encoder_2 is not None:
        raise ValueError("a WanPipeline has one text encoder; this pipeline has a second (text_encoder_2)")
    return WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                       scheduler=pipe.scheduler, transformer=transformer_to_wan(pipe.transformer, rope_max_seq_len))

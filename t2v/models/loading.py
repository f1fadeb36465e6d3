"""Models from a preset name, a YAML config or a saved folder."""

from __future__ import annotations

import json
import os

import torch
from torch import nn


def resolve_model_spec(spec: str, kind: str) -> str:
    """A folder or YAML path as given; a bare preset name ("tiny") -> t2v/models/configs/{kind}_{name}.yaml."""
    if not spec:
        raise ValueError(f"model.{kind} is empty; give a preset name, a YAML file or a model folder")
    if os.path.isdir(spec) or spec.endswith((".yaml", ".yml")):
        if not os.path.exists(spec):
            raise ValueError(f"model.{kind}={spec!r} does not exist")
        return spec
    from t2v.models.presets import preset_path

    return str(preset_path(kind, spec))


def build_model(cls, spec: str, kind: str, seed: int) -> nn.Module:
    """`cls.from_pretrained(folder)`, or `cls.from_config(yaml)` initialised from `seed`."""
    path = resolve_model_spec(spec, kind)
    if os.path.isdir(path):
        return cls.from_pretrained(path)
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    return cls.from_config(OmegaConf.to_container(OmegaConf.load(path)))


def load_vae(spec: str, seed: int) -> nn.Module:
    """Our `CausalVideoVAE` (preset, YAML or folder) or a diffusers video VAE folder (`load_vae_folder`)."""
    from t2v.models.vae import CausalVideoVAE

    path = resolve_model_spec(spec, "vae")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model.vae={spec!r} is a folder without config.json")
        return load_vae_folder(path)
    return build_model(CausalVideoVAE, path, "vae", seed)


def load_vae_folder(path: str) -> nn.Module:
    """A saved VAE of any class T2V can use (`t2v.models.vae_utils.VAE_FORMATS`: ours, Wan, CogVideoX, ...),
    the class named by `_class_name` in its config.json; ValueError naming a class T2V cannot use."""
    from t2v.models.vae_utils import check_vae_class

    with open(os.path.join(path, "config.json")) as f:
        class_name = json.load(f).get("_class_name") or "CausalVideoVAE"
    try:
        check_vae_class(class_name)  # before reading any weights
    except ValueError as e:
        raise ValueError(f"VAE folder {path!r}: {e}") from None
    if class_name == "CausalVideoVAE":
        from t2v.models.vae import CausalVideoVAE as cls
    else:
        import diffusers

        cls = getattr(diffusers, class_name)
    return cls.from_pretrained(path)

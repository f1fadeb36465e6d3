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
    """Our `CausalVideoVAE` (preset, YAML or folder) or a diffusers `AutoencoderKLWan` folder.

    A folder's class comes from `_class_name` in its config.json.
    """
    from t2v.models.vae import CausalVideoVAE

    path = resolve_model_spec(spec, "vae")
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"model.vae={spec!r} is a folder without config.json")
        with open(config_file) as f:
            class_name = json.load(f).get("_class_name")
        if class_name == "AutoencoderKLWan":
            from diffusers import AutoencoderKLWan

            return AutoencoderKLWan.from_pretrained(path)
        if class_name not in (None, "CausalVideoVAE"):
            raise ValueError(f"VAE folder {path!r} holds a {class_name}; expected CausalVideoVAE or AutoencoderKLWan")
    return build_model(CausalVideoVAE, path, "vae", seed)

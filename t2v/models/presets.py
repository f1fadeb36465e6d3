"""Model presets: YAML files of constructor arguments shipped inside the package (`t2v/models/configs/`).

`dit_shapes.yaml` is preset "shapes" of kind "dit"; a training config names it `model.dit=shapes`. Being package
data, the presets travel with a non-editable install (`pip install .`), so training works from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().with_name("configs")


def preset_path(kind: str, name: str) -> Path:
    """The YAML of preset `name` of `kind` ("dit" or "vae"); ValueError listing the presets if there is none."""
    path = PRESET_DIR / f"{kind}_{name}.yaml"
    if not path.is_file():
        raise ValueError(f"model.{kind}={name!r} is not a folder, a YAML file or a preset; presets: {preset_names(kind)}")
    return path


def preset_names(kind: str) -> list[str]:
    return sorted(p.stem[len(kind) + 1 :] for p in PRESET_DIR.glob(f"{kind}_*.yaml"))


def load_preset(stem: str) -> dict:
    """Constructor arguments of preset file `{stem}.yaml` (e.g. "dit_tiny")."""
    from omegaconf import OmegaConf

    path = PRESET_DIR / f"{stem}.yaml"
    if not os.path.isfile(path):
        raise ValueError(f"no preset {stem!r} in {PRESET_DIR}")
    return OmegaConf.to_container(OmegaConf.load(path))


__all__ = ["PRESET_DIR", "load_preset", "preset_names", "preset_path"]

"""Checkpoint folders: tensors in safetensors, small state in JSON, written atomically.

    {output_dir}/checkpoints/step-{N}/
        model.safetensors  ema.safetensors  optimizer.safetensors  rng.safetensors   (tensor groups)
        state.json                                                                    (everything else)

A folder is written as `step-N.tmp-*` and renamed into place, so a `step-N` folder is always complete;
`latest_checkpoint` ignores leftovers of interrupted writes. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """"" -> None (fresh start); "latest" -> newest complete checkpoint or None; else a checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(checkpoint_root(output_dir))
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise ValueError(f"resume={resume!r} is not a checkpoint folder (no {STATE_FILE}); use '', 'latest' or a step-N path")
    return resume


def save_checkpoint(
    root: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep_last: int = 0
) -> str:
    """Write `{root}/step-{step}` atomically; then delete all but the newest `keep_last` (0 keeps all)."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f"step-{step}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    for group, named in tensors.items():
        save_file({name: t.detach().cpu().contiguous() for name, t in named.items()}, os.path.join(tmp, f"{group}.safetensors"))
    # state.json last: its presence marks the folder complete.
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(state, f)
    if os.path.exists(final):  # the same step saved again (e.g. after a resume): swap it out
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep_last > 0:
        for _, path in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(path)
    return final


def load_checkpoint(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensor groups, state) of a checkpoint folder."""
    tensors = {
        name[: -len(".safetensors")]: load_file(os.path.join(path, name))
        for name in sorted(os.listdir(path))
        if name.endswith(".safetensors")
    }
    with open(os.path.join(path, STATE_FILE)) as f:
        return tensors, json.load(f)


# Optimizer state: tensors flattened to "{param index}.{key}", the rest (param_groups, scalars) in JSON.


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# RNG: python and numpy states in JSON, torch (CPU, CUDA, explicit generators) as uint8 tensors.


def capture_rng(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    for name, generator in generators.items():
        tensors[f"generator.{name}"] = generator.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if torch.cuda.is_available() and cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    for name, generator in generators.items():
        key = f"generator.{name}"
        if key not in tensors:
            raise ValueError(f"checkpoint has no state for generator {name!r}; it has {sorted(tensors)}")
        generator.set_state(tensors[key])

"""Checkpoint folders: tensors in safetensors, small state in JSON, written atomically.

    {output_dir}/checkpoints/step-{N}/
        model.safetensors  ema.safetensors  optimizer.safetensors  rng.safetensors   (tensor groups)
        state.json                                                                    (everything else)

A folder is written as `step-N.tmp-*` and renamed into place, so a `step-N` folder is always complete;
`latest_checkpoint` ignores leftovers of interrupted writes, and the next save removes them. `state.json`
lists each tensor file's size and SHA-256; `verify_checkpoint` checks them, and `resume=latest` falls back
past a damaged newest checkpoint (truncated, edited or missing files) to the newest intact one, with a
warning naming the damaged one. Nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
FILES_KEY = "_files"  # in state.json: {file name: [size in bytes, sha256 hex]}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-\d+\.(tmp|old)-[0-9a-f]+$")


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


def run_files(output_dir: str) -> list[str]:
    """What in `output_dir` belongs to a training run (checkpoints, metrics, an exported pipeline), by name."""
    held = [f"checkpoints/step-{step}" for step, _ in list_checkpoints(checkpoint_root(output_dir))][-1:]
    held += [name for name in ("metrics.jsonl", "pipeline", "vae") if os.path.exists(os.path.join(output_dir, name))]
    return held


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_damage(path: str) -> str | None:
    """What is wrong with the checkpoint folder `path`, or None when it is intact.

    Checks that state.json parses and that every tensor file it lists has its recorded size and SHA-256
    (folders written before the list existed: that every tensor file's header reads).
    """
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict):
        return f"{STATE_FILE} holds no JSON object"
    files = state.get(FILES_KEY)
    if files is None:
        from safetensors import safe_open

        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(path, name), framework="pt"):
                        pass
                except Exception as e:  # safetensors raises its own error types for damaged headers
                    return f"{name} is unreadable ({type(e).__name__})"
        return None
    for name, (size, sha) in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {size} were written"
        if _sha256(file) != sha:
            return f"{name} does not match the checksum written with it"
    return None


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """"" -> None (fresh start); "latest" -> newest intact checkpoint or None; else a checkpoint folder.

    "latest" skips damaged checkpoints with a warning naming each; a named checkpoint that is damaged is an error.
    """
    if not resume:
        return None
    if resume == "latest":
        for _, path in reversed(list_checkpoints(checkpoint_root(output_dir))):
            damage = checkpoint_damage(path)
            if damage is None:
                return path
            warnings.warn(f"checkpoint {path!r} is damaged ({damage}); trying the one before it", stacklevel=2)
        return None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise ValueError(f"resume={resume!r} is not a checkpoint folder (no {STATE_FILE}); use '', 'latest' or a step-N path")
    if (damage := checkpoint_damage(resume)) is not None:
        raise ValueError(f"resume={resume!r} is a damaged checkpoint: {damage}")
    return resume


def save_checkpoint(
    root: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep_last: int = 0
) -> str:
    """Write `{root}/step-{step}` atomically; then delete all but the newest `keep_last` (0 keeps all)."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of interrupted writes (one writer: rank 0)
        if _LEFTOVER.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f"step-{step}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    for group, named in tensors.items():
        save_file({name: t.detach().cpu().contiguous() for name, t in named.items()}, os.path.join(tmp, f"{group}.safetensors"))
    # state.json last: its presence marks the folder complete; it lists what was written with checksums.
    files = {name: [os.path.getsize(os.path.join(tmp, name)), _sha256(os.path.join(tmp, name))]
             for name in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump({**state, FILES_KEY: files}, f)
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
        state = json.load(f)
    state.pop(FILES_KEY, None)
    return tensors, state


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

"""Checkpoint folders: tensors in safetensors, small state in JSON, written atomically.

    {output_dir}/checkpoints/step-{N}/
        model.safetensors  ema.safetensors  optimizer.safetensors  rng.safetensors   (tensor groups, "full")
        model.00000-000.safetensors  model.00001-000.safetensors  ...                 (the same, "sharded")
        state.json                                                                    (everything else)

Either way the files hold whole tensors by name, so a checkpoint resumes on any process count and backend;
a file's group is its name up to the first dot. "full": rank 0 writes every group (`save_checkpoint`).
"sharded": each rank writes the tensors it was dealt, streamed into files of at most `SHARD_BYTES`
(`save_sharded`, collective), so no rank ever holds the whole state.

A folder is written as `step-N.tmp-*` and renamed into place, so a `step-N` folder is always complete;
`latest_checkpoint` ignores leftovers of interrupted writes, and the next save removes them. `state.json`
lists each tensor file's size and SHA-256; `verify_checkpoint` checks them, and `resume=latest` falls back
past a damaged newest checkpoint (truncated, edited or missing files) to the newest intact one, with a
warning naming the damaged one. Nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import uuid
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
FILES_KEY = "_files"  # in state.json: {file name: [size in bytes, sha256 hex]}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-\d+\.(tmp|old)-[0-9a-f]+$")
SHARD_BYTES = 1 << 30  # largest shard file of a sharded save: what one rank holds besides its partitions


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


def _begin(root: str, step: int) -> str:
    """A fresh `step-N.tmp-*` folder under `root`, after removing leftovers of interrupted writes."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if _LEFTOVER.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = os.path.join(root, f"step-{step}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    return tmp


def _listing(folder: str, names: Iterable[str]) -> dict[str, list]:
    return {name: [os.path.getsize(os.path.join(folder, name)), _sha256(os.path.join(folder, name))] for name in names}


def _commit(root: str, step: int, tmp: str, state: dict, files: dict[str, list], keep_last: int) -> str:
    """state.json into `tmp` (its presence marks the folder complete; it lists every file with its checksum),
    then `tmp` renamed to `step-{step}`; then all but the newest `keep_last` checkpoints deleted (0 keeps all)."""
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump({**state, FILES_KEY: dict(sorted(files.items()))}, f)
    final = os.path.join(root, f"step-{step}")
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


def _write_groups(folder: str, tensors: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    for group, named in tensors.items():
        save_file({name: t.detach().cpu().contiguous() for name, t in named.items()},
                  os.path.join(folder, f"{group}.safetensors"))
    return [f"{group}.safetensors" for group in tensors]


def save_checkpoint(
    root: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep_last: int = 0
) -> str:
    """Write `{root}/step-{step}` atomically, one file per tensor group; then delete all but the newest
    `keep_last` (0 keeps all). One writer (rank 0)."""
    tmp = _begin(root, step)
    return _commit(root, step, tmp, state, _listing(tmp, _write_groups(tmp, tensors)), keep_last)


class Dealer:
    """Which rank keeps each tensor of a sharded save: the one holding the fewest bytes so far (ties: the lowest
    rank). Every rank sees the same sequence of sizes, so every rank deals the same way."""

    def __init__(self, world_size: int):
        self.held = [0] * world_size

    def deal(self, nbytes: int) -> int:
        rank = self.held.index(min(self.held))
        self.held[rank] += nbytes
        return rank


class ShardWriter:
    """One rank's tensors of a sharded save, in files `{group}.{rank:05d}-{part:03d}.safetensors` of at most
    `max_bytes` each (a tensor larger than that gets a file of its own)."""

    def __init__(self, folder: str, rank: int, max_bytes: int = SHARD_BYTES):
        self.folder, self.rank, self.max_bytes = folder, rank, max_bytes
        self.group, self.pending, self.pending_bytes = None, {}, 0
        self.parts: dict[str, int] = {}
        self.written: list[str] = []

    def add(self, group: str, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if group != self.group or (self.pending and self.pending_bytes + nbytes > self.max_bytes):
            self.flush()
        self.group = group
        self.pending[name] = tensor.detach().cpu().contiguous()
        self.pending_bytes += nbytes

    def flush(self) -> None:
        if self.pending:
            part = self.parts.get(self.group, 0)
            self.parts[self.group] = part + 1
            name = f"{self.group}.{self.rank:05d}-{part:03d}.safetensors"
            save_file(self.pending, os.path.join(self.folder, name))
            self.written.append(name)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, list]:
        """{file name: [size, sha256]} of everything this rank wrote."""
        self.flush()
        return _listing(self.folder, self.written)


def save_sharded(root: str, step: int, tensors: Iterable[tuple[str, str, torch.Tensor]],
                 small: dict[str, dict[str, torch.Tensor]], state: dict, keep_last: int = 0,
                 max_bytes: int = SHARD_BYTES) -> str:
    """Write `{root}/step-{step}` atomically from every rank (collective: every rank calls it).

    `tensors` yields (group, name, whole tensor) in the same order on every rank, one at a time; each rank
    keeps and writes only the tensors dealt to it (`Dealer`). Rank 0 also writes the `small` groups (the RNG
    states) and, once every rank's files are listed with their checksums, state.json and the rename. A save
    killed midway leaves only a `.tmp-` folder, which no resume picks and the next save removes.
    The folder must be on a file system every rank sees.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tmp = [_begin(root, step) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    dealer, writer = Dealer(world_size), ShardWriter(tmp, rank, max_bytes)
    for group, name, tensor in tensors:
        if dealer.deal(tensor.numel() * tensor.element_size()) == rank:
            writer.add(group, name, tensor)
    files = writer.close()
    if rank == 0:
        files.update(_listing(tmp, _write_groups(tmp, small)))
    listings = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(listings, files)
    else:
        listings = [files]
    final = os.path.join(root, f"step-{step}")
    if rank == 0:
        merged = {name: entry for listing in listings for name, entry in listing.items()}
        final = _commit(root, step, tmp, state, merged, keep_last)
    if world_size > 1:
        dist.barrier()  # nobody goes on (or resumes) before the folder is in place
    return final


def _mapped_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of a private memory map: pages are read when touched and stay
    file-backed page cache until written, so a resume does not hold a second copy of the whole state."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        has_data = os.path.getsize(path) > 8 + header_len  # mmap refuses an empty mapping
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if has_data else None
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def load_checkpoint(path: str, mapped: bool = False) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensor groups, state) of a checkpoint folder, full or sharded. With `mmap` the tensors are views of
    the files (see `_mapped_safetensors`), read as they are used."""
    read = _mapped_safetensors if mapped else load_file
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.setdefault(name.split(".", 1)[0], {}).update(read(os.path.join(path, name)))
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

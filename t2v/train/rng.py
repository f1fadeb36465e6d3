"""Randomness of a training run: which noise a micro-batch draws, and the RNG states a checkpoint holds.

Nothing random may depend on the topology (process count, accumulation, sequence parallelism):
- data order: the sampler counts *global* batches (t2v.data.buckets);
- noise, sigmas, latent samples: `noise_seed(seed, micro_batch_index(...))` reseeds the training generator
  for every global micro-batch, index = (step * grad_accum + micro) * dp_world + dp_rank; so 2 ranks x 1
  micro-batch and 1 rank x 2 micro-batches see the same samples with the same noise, and the ranks of a
  sequence-parallel group draw the same noise;
- the global python / numpy / torch RNGs (unused by the loss): `gather_rng` stores each rank's state; a
  resume on the same world size restores each rank's own, on another world size every rank reseeds them
  from (seed, step, rank) (`restore_or_reseed_rng`).

In a checkpoint's "rng" group the tensors are "{rank}.{key}" (key: "torch", "cuda.{i}", "generator.{name}")
and the meta is {"ranks": [{"python": ..., "numpy": ...}, ...]}; checkpoints without "ranks" hold one
process's state under plain keys.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from t2v.runtime import seed_everything


def noise_seed(seed: int, index: int) -> int:
    """Seed of the training generator for global micro-batch `index` (a 63-bit mix of both)."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63)


def micro_batch_index(step: int, micro: int, grad_accum: int, rank: int, world_size: int) -> int:
    """Global position of a rank's micro-batch: step-major, then micro-batch, then rank."""
    return (step * grad_accum + micro) * world_size + rank


# ----------------------------------------------------------------------------------------------------
# One process: python and numpy states as JSON, torch (CPU, CUDA, explicit generators) as uint8 tensors
# ----------------------------------------------------------------------------------------------------


def capture_process_rng(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: (tensors, JSON-serialisable meta)."""
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


def restore_process_rng(tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator]) -> None:
    """Put states from `capture_process_rng` back into this process's RNGs and `generators`."""
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


# ----------------------------------------------------------------------------------------------------
# Every rank: one checkpoint group
# ----------------------------------------------------------------------------------------------------


def gather_rng(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every rank's RNG states as one checkpoint group: tensors "{rank}.{key}", meta {"ranks": [...]}.

    Collective: all ranks call it; the result is complete on every rank.
    """
    tensors, meta = capture_process_rng(generators)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, ({k: v.cpu() for k, v in tensors.items()}, meta))
    else:
        everyone = [(tensors, meta)]
    flat = {f"{rank}.{key}": value for rank, (named, _) in enumerate(everyone) for key, value in named.items()}
    return flat, {"ranks": [rank_meta for _, rank_meta in everyone]}


def restore_or_reseed_rng(tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator],
                          seed: int, step: int) -> str:
    """Restore this rank's RNG states from a `gather_rng` group, or reseed them when the checkpoint's world
    size differs. Returns "restored" or "reseeded". Single-process checkpoints (no "ranks") restore as is."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if "ranks" not in meta:
        if world_size == 1:
            restore_process_rng(tensors, meta, generators)
            return "restored"
        saved_world = 1
    else:
        saved_world = len(meta["ranks"])
    if saved_world == world_size:
        prefix = f"{rank}."
        own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        restore_process_rng(own, meta["ranks"][rank], generators)
        return "restored"
    seed_everything(noise_seed(seed, step * 65536 + rank))
    for generator in generators.values():
        generator.manual_seed(noise_seed(seed + 1, step * 65536 + rank))
    return "reseeded"

"""Latent and text-embedding cache: encode a manifest once, train from safetensors shards.

Layout of a cache folder:

    shard-{start:08d}-{end:08d}.safetensors   manifest rows [start, end): per row i the tensors
        "{i}.latent_mean", "{i}.latent_logvar"  (C, t, h, w)  the VAE posterior
        "{i}.text_states" (L, D), "{i}.text_mask" (L,) bool, "{i}.pooled" (Dp,)
        and in the metadata (one JSON string, so files are byte-reproducible) the captions, the rows
        skipped by reason, and the fingerprint
    empty.safetensors   the embedding of the empty caption "" (for caption dropout)
    index.json          written last: fingerprint, shards, the rows present, skip counts

Shards cover fixed row ranges of `shard_size` rows, and shard k is written by rank k % world_size,
so the files do not depend on how many processes wrote them, and a reader maps a row to its shard
however many processes read. Every file is written to a temporary name and renamed; an interrupted
run keeps its finished shards and redoes the rest. The fingerprint records what made the cache
(VAE, text encoder, clip shape and fps, manifest bytes); `LatentCache` refuses a cache whose
fingerprint differs from the one expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from t2v.data.buckets import Bucket
from t2v.data.dataset import VideoTextDataset, collate_skip_none
from t2v.data.manifest import load_manifest

CACHE_FORMAT = 1
INDEX_FILE = "index.json"
EMPTY_FILE = "empty.safetensors"
TEXT_KEYS = ("text_states", "text_mask", "pooled")
SAMPLE_KEYS = ("latent_mean", "latent_logvar", *TEXT_KEYS)
REBUILD_HINT = "rebuild it with scripts/precompute.py into an empty --out folder (or delete {path})"


# ---------------------------------------------------------------- fingerprints


@dataclass(frozen=True)
class CacheFingerprint:
    vae: str  # vae_fingerprint(vae)
    text_encoder: str  # text_embedder.fingerprint()
    frames: int
    height: int
    width: int
    fps: float | None
    manifest: str  # manifest_fingerprint(path)

    def mismatches(self, other: CacheFingerprint) -> list[str]:
        """Names of the fields that differ."""
        mine, theirs = asdict(self), asdict(other)
        return [name for name in mine if mine[name] != theirs[name]]


def _digest_weights(model: torch.nn.Module) -> str:
    # First and last parameter tensors: cheap, and enough to tell checkpoints of one config apart.
    params = list(model.parameters())
    h = hashlib.sha256()
    for p in (params[0], params[-1]) if params else ():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE class, its config (sorted JSON, private "_" keys left out) and a weight digest."""
    config = {key: value for key, value in dict(vae.config).items() if not key.startswith("_")}
    payload = {"class": type(vae).__name__, "config": config, "weights": _digest_weights(vae)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_fingerprint(path: str) -> str:
    """sha256 of the manifest file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def make_fingerprint(vae, text_embedder, manifest_path: str, frames: int, height: int, width: int,
                     fps: float | None = None) -> CacheFingerprint:
    return CacheFingerprint(
        vae=vae_fingerprint(vae), text_encoder=text_embedder.fingerprint(), frames=frames, height=height,
        width=width, fps=fps, manifest=manifest_fingerprint(manifest_path),
    )


# ---------------------------------------------------------------- writing


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:08d}-{end:08d}.safetensors"


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be at least 1")
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def _save_atomic(tensors: dict, path: str, info: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    metadata = {"cache": json.dumps(info, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _shard_info(path: str) -> dict | None:
    """The JSON metadata of a cache file; None when it cannot be read."""
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["cache"])
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):
        return None


def _encode_text(text_embedder, captions: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = text_embedder(captions)
    return {
        "text_states": out.states.to("cpu", dtype),  # (B, L, D)
        "text_mask": out.mask.to("cpu", torch.bool),  # (B, L)
        "pooled": out.pooled.to("cpu", dtype),  # (B, Dp)
    }


@torch.no_grad()
def write_cache(
    out_dir: str,
    manifest_path: str,
    vae,
    text_embedder,
    frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    batch_size: int = 4,
    shard_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    num_workers: int = 0,
    columns: dict | None = None,
    progress: bool = False,
) -> CacheFingerprint:
    """Encode this rank's shards (shard k goes to rank k % world_size); returns the fingerprint.

    Clips are read from the start of each file at `fps`. Rows that cannot be read are skipped and
    counted. Existing shards with the same fingerprint are kept. Call `finalize_cache` once all ranks
    are done. Rank 0 also writes the empty-caption embedding.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"cache dtype {dtype} must be float16, bfloat16 or float32")
    from t2v.models.vae_utils import latent_shape

    latent_shape(vae, frames, height, width)  # raises for a clip shape the VAE cannot take
    fingerprint = make_fingerprint(vae, text_embedder, manifest_path, frames, height, width, fps)
    fingerprint_dict = asdict(fingerprint)
    os.makedirs(out_dir, exist_ok=True)
    rows = load_manifest(manifest_path, columns=columns)
    bucket = Bucket(frames=frames, height=height, width=width, batch_size=batch_size)
    dataset = VideoTextDataset(rows, [bucket], fps=fps, start=None)
    vae_device = next(vae.parameters()).device
    vae_dtype = next(vae.parameters()).dtype

    if rank == 0:
        save_empty_caption(out_dir, text_embedder, fingerprint, dtype)

    mine = shard_ranges(len(rows), shard_size)[rank::world_size]
    for start, end in tqdm(mine, desc=f"shards (rank {rank})", disable=not progress):
        path = os.path.join(out_dir, shard_name(start, end))
        existing = _shard_info(path) if os.path.exists(path) else None
        if existing is not None and existing["fingerprint"] == fingerprint_dict:
            continue
        tensors, captions, skipped = {}, {}, Counter()
        # (row, bucket) pairs: every row is read at the cache's one clip shape.
        loader = DataLoader(dataset, batch_size=batch_size, sampler=[(i, 0) for i in range(start, end)],
                            collate_fn=collate_skip_none, num_workers=num_workers)
        for batch in loader:
            skipped.update(batch["skipped"])
            if batch["video"] is None:
                continue
            video = batch["video"].to(vae_device, vae_dtype)  # (B, C, T, H, W)
            posterior = vae.encode(video).latent_dist
            encoded = {
                "latent_mean": posterior.mean.to("cpu", dtype),  # (B, C, t, h, w)
                "latent_logvar": posterior.logvar.to("cpu", dtype),  # (B, C, t, h, w)
                **_encode_text(text_embedder, batch["caption"], dtype),
            }
            for b, index in enumerate(batch["index"].tolist()):
                captions[str(index)] = batch["caption"][b]
                for key, value in encoded.items():
                    tensors[f"{index}.{key}"] = value[b].clone()
        save_shard(out_dir, start, end, tensors, captions, fingerprint, skipped)
    return fingerprint


def save_empty_caption(out_dir: str, text_embedder, fingerprint: CacheFingerprint, dtype: torch.dtype) -> None:
    """Write the embedding of the caption "" (used for caption dropout)."""
    empty = {key: value[0] for key, value in _encode_text(text_embedder, [""], dtype).items()}
    _save_atomic(empty, os.path.join(out_dir, EMPTY_FILE), {"fingerprint": asdict(fingerprint)})


def save_shard(out_dir: str, start: int, end: int, tensors: dict[str, torch.Tensor], captions: dict[str, str],
               fingerprint: CacheFingerprint, skipped: dict[str, int] | None = None) -> None:
    """Write the shard of rows [start, end): tensors "{row}.{key}" for the SAMPLE_KEYS, captions {"row": text}."""
    info = {"fingerprint": asdict(fingerprint), "captions": captions, "skipped": dict(skipped or {})}
    _save_atomic(tensors, os.path.join(out_dir, shard_name(start, end)), info)


def finalize_cache(out_dir: str, num_rows: int, shard_size: int = 256, wait_seconds: float = 0.0) -> dict:
    """Check that every shard exists with one fingerprint, then write index.json; returns the index.

    Waits up to `wait_seconds` for shards other processes are still writing.
    """
    ranges = shard_ranges(num_rows, shard_size)
    deadline = time.monotonic() + wait_seconds
    while True:
        missing = [shard_name(s, e) for s, e in ranges if not os.path.exists(os.path.join(out_dir, shard_name(s, e)))]
        if not os.path.exists(os.path.join(out_dir, EMPTY_FILE)):
            missing.append(EMPTY_FILE)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if missing:
        raise ValueError(f"cache {out_dir!r} is incomplete: missing {missing[:5]} ({len(missing)} files); "
                         "run write_cache for every rank first")

    fingerprints, samples, skipped, shards = set(), [], Counter(), []
    for start, end in ranges:
        name = shard_name(start, end)
        info = _shard_info(os.path.join(out_dir, name))
        if info is None:
            raise ValueError(f"shard {name!r} in {out_dir!r} cannot be read; delete it and rerun precompute")
        fingerprints.add(json.dumps(info["fingerprint"], sort_keys=True))
        samples.extend(sorted(int(i) for i in info["captions"]))
        skipped.update(info["skipped"])
        shards.append({"file": name, "start": start, "end": end})
    empty_info = _shard_info(os.path.join(out_dir, EMPTY_FILE))
    if empty_info is None:
        raise ValueError(f"{EMPTY_FILE!r} in {out_dir!r} cannot be read; delete it and rerun precompute")
    fingerprints.add(json.dumps(empty_info["fingerprint"], sort_keys=True))
    if len(fingerprints) != 1:
        raise ValueError(f"shards in {out_dir!r} were made with {len(fingerprints)} different fingerprints; "
                         + REBUILD_HINT.format(path=out_dir))
    if not samples:
        raise ValueError(f"no readable sample among the {num_rows} manifest rows (skipped by cause: {dict(skipped)}); "
                         f"cache {out_dir!r} is left without an index")
    index = {
        "format": CACHE_FORMAT,
        "fingerprint": json.loads(fingerprints.pop()),
        "num_rows": num_rows,
        "shard_size": shard_size,
        "shards": shards,
        "samples": samples,
        "num_samples": len(samples),
        "skipped": dict(skipped),
        "empty_caption": EMPTY_FILE,
    }
    tmp = os.path.join(out_dir, f"{INDEX_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, INDEX_FILE))
    return index


# ---------------------------------------------------------------- reading


class LatentCache:
    """Read access to a finished cache; refuses one whose fingerprint differs from `expected_fingerprint`."""

    def __init__(self, path: str, expected_fingerprint: CacheFingerprint | None = None):
        index_path = os.path.join(path, INDEX_FILE)
        if not os.path.exists(index_path):
            raise ValueError(f"{path!r} has no {INDEX_FILE}: the cache is missing or unfinished; "
                             + REBUILD_HINT.format(path=path))
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache {path!r} has format {index.get('format')}, expected {CACHE_FORMAT}; "
                             + REBUILD_HINT.format(path=path))
        self.path = path
        self.fingerprint = CacheFingerprint(**index["fingerprint"])
        if expected_fingerprint is not None:
            fields = self.fingerprint.mismatches(expected_fingerprint)
            if fields:
                details = ", ".join(f"{name}: cached {getattr(self.fingerprint, name)!r} != expected "
                                    f"{getattr(expected_fingerprint, name)!r}" for name in fields)
                raise ValueError(f"cache {path!r} is stale ({details}); " + REBUILD_HINT.format(path=path))
        self.samples: list[int] = index["samples"]  # manifest row of each cached sample
        self.skipped: dict[str, int] = index["skipped"]
        self.shard_size: int = index["shard_size"]
        self.shards: list[dict] = index["shards"]
        self._handles: dict[str, object] = {}  # file name -> open safetensors handle
        self._captions: dict[str, dict[str, str]] = {}  # shard file name -> {row: caption}

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self):
        # Open safetensors handles do not pickle (DataLoader workers); each process reopens its own.
        return {**self.__dict__, "_handles": {}, "_captions": {}}

    def _handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(os.path.join(self.path, name), framework="pt")
        return self._handles[name]

    def row(self, row: int) -> dict:
        """The cached tensors and caption of manifest row `row`."""
        shard = self.shards[row // self.shard_size]
        handle = self._handle(shard["file"])
        sample = {key: handle.get_tensor(f"{row}.{key}") for key in SAMPLE_KEYS}
        if shard["file"] not in self._captions:
            self._captions[shard["file"]] = json.loads(handle.metadata()["cache"])["captions"]
        sample["caption"] = self._captions[shard["file"]][str(row)]
        sample["index"] = row
        return sample

    def empty_caption(self) -> dict[str, torch.Tensor]:
        """text_states (L, D), text_mask (L,), pooled (Dp,) of the caption ""."""
        handle = self._handle(EMPTY_FILE)
        return {key: handle.get_tensor(key) for key in TEXT_KEYS}


class LatentCacheDataset(Dataset):
    """Cached samples as {"latent_mean", "latent_logvar", "text_states", "text_mask", "pooled", "caption",
    "index"}; item j is the j-th cached row (rows that could not be read are not in the cache)."""

    def __init__(self, path: str, expected_fingerprint: CacheFingerprint | None = None):
        self.cache = LatentCache(path, expected_fingerprint)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, j: int) -> dict:
        return self.cache.row(self.cache.samples[j])


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw z = mean + exp(logvar / 2) * eps in float32 (the cache stores the posterior, not a sample)."""
    mean, logvar = mean.float(), logvar.float()
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise

"""Latent cache: round trip, stale-cache refusal, sharded writing independent of the process count."""

import csv
import hashlib
import os
from dataclasses import replace

import imageio
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from t2v.data.cache import (
    LatentCache,
    LatentCacheDataset,
    finalize_cache,
    make_fingerprint,
    sample_latent,
    write_cache,
)
from t2v.data.dataset import frames_to_tensor
from t2v.data.video import read_clip
from t2v.models.text_encoder import TextEmbeddings

FRAMES, HEIGHT, WIDTH = 5, 16, 16


class HashTextEmbedder:
    """Stands in for TextEmbedder: deterministic embeddings from the caption's bytes."""

    def __init__(self, length=6, dim=4):
        self.length, self.dim = length, dim

    def __call__(self, prompts):
        states = torch.zeros(len(prompts), self.length, self.dim)
        mask = torch.zeros(len(prompts), self.length, dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            codes = list(prompt.encode())[: self.length]
            mask[b, : len(codes)] = True
            for j, code in enumerate(codes):
                states[b, j] = torch.arange(self.dim) + code / 10
        pooled = states.sum(dim=1)[:, :3]
        return TextEmbeddings(states=states, mask=mask, pooled=pooled)

    def fingerprint(self):
        return hashlib.sha256(f"hash-{self.length}-{self.dim}".encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def vae():
    # One thread: tiny convolutions are many times slower when threads compete for a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                           temperal_downsample=[True], attn_scales=[]).eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_media")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        frames = rng.integers(0, 256, (8, 16, 24, 3), dtype=np.uint8)
        imageio.mimwrite(str(root / f"v{i}.mp4"), frames, fps=8, codec="libx264", macro_block_size=1)
        rows.append([f"v{i}.mp4", f"clip number {i}"])
    rows.insert(2, ["gone.mp4", "missing file"])
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], *rows])
    return str(path)


def build(out, manifest, vae, rank=0, world_size=1):
    return write_cache(str(out), manifest, vae, HashTextEmbedder(), FRAMES, HEIGHT, WIDTH, batch_size=2,
                       shard_size=2, rank=rank, world_size=world_size)


def test_round_trip(tmp_path, manifest, vae):
    fingerprint = build(tmp_path, manifest, vae)
    index = finalize_cache(str(tmp_path), num_rows=6, shard_size=2)
    assert index["num_samples"] == 5 and index["skipped"] == {"missing": 1}
    assert sorted(os.listdir(tmp_path)) == ["empty.safetensors", "index.json", "shard-00000000-00000002.safetensors",
                                            "shard-00000002-00000004.safetensors",
                                            "shard-00000004-00000006.safetensors"]

    dataset = LatentCacheDataset(str(tmp_path), fingerprint)
    assert len(dataset) == 5
    sample = dataset[2]  # the missing row 2 is left out, so item 2 is row 3 = v2.mp4
    assert sample["index"] == 3 and sample["caption"] == "clip number 2"
    assert sample["latent_mean"].shape == (4, 3, 8, 8) and sample["latent_mean"].dtype == torch.bfloat16
    assert sample["latent_logvar"].shape == (4, 3, 8, 8)
    assert sample["text_states"].shape == (6, 4) and sample["text_mask"].dtype == torch.bool
    assert sample["pooled"].shape == (3,)

    # The cached posterior is the VAE's own, up to bf16 rounding.
    clip = frames_to_tensor(read_clip(os.path.join(os.path.dirname(manifest), "v2.mp4"), FRAMES, height=HEIGHT,
                                      width=WIDTH))
    with torch.no_grad():
        posterior = vae.encode(clip[None]).latent_dist
    torch.testing.assert_close(sample["latent_mean"].float(), posterior.mean[0], atol=2e-2, rtol=2e-2)
    expected_text = HashTextEmbedder()(["clip number 2"])
    torch.testing.assert_close(sample["text_states"].float(), expected_text.states[0], atol=2e-2, rtol=1e-2)

    empty = LatentCache(str(tmp_path)).empty_caption()
    assert not empty["text_mask"].any() and empty["text_states"].shape == (6, 4)

    z = sample_latent(sample["latent_mean"], sample["latent_logvar"], torch.Generator().manual_seed(0))
    z_again = sample_latent(sample["latent_mean"], sample["latent_logvar"], torch.Generator().manual_seed(0))
    assert z.dtype == torch.float32 and torch.equal(z, z_again)
    assert not torch.equal(z, sample["latent_mean"].float())


def test_stale_cache_is_refused(tmp_path, manifest, vae):
    fingerprint = build(tmp_path, manifest, vae)
    finalize_cache(str(tmp_path), num_rows=6, shard_size=2)
    assert make_fingerprint(vae, HashTextEmbedder(), manifest, FRAMES, HEIGHT, WIDTH) == fingerprint
    with pytest.raises(ValueError, match=r"stale \(height: cached 16 != expected 32\).*precompute"):
        LatentCache(str(tmp_path), replace(fingerprint, height=32))
    other_text = make_fingerprint(vae, HashTextEmbedder(dim=8), manifest, FRAMES, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="text_encoder") as error:
        LatentCache(str(tmp_path), other_text)
    assert "vae" not in str(error.value).split("stale")[1].split(";")[0]
    with pytest.raises(ValueError, match="no index.json"):
        LatentCache(str(tmp_path / "nothing"))


def test_two_process_write_equals_one_process(tmp_path, manifest, vae):
    build(tmp_path / "one", manifest, vae)
    finalize_cache(str(tmp_path / "one"), num_rows=6, shard_size=2)
    two = tmp_path / "two"
    build(two, manifest, vae, rank=1, world_size=2)
    with pytest.raises(ValueError, match="incomplete"):
        finalize_cache(str(two), num_rows=6, shard_size=2)
    build(two, manifest, vae, rank=0, world_size=2)
    finalize_cache(str(two), num_rows=6, shard_size=2)
    assert sorted(os.listdir(two)) == sorted(os.listdir(tmp_path / "one"))
    for name in os.listdir(two):  # files are byte-identical, index included
        assert (two / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

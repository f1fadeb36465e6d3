"""VAE read-back bound: a perfect autoencoder reads back 100%, a random one does not, and the script writes JSON."""

import json
import runpy
from types import SimpleNamespace

import torch
from torch import nn

from t2v.eval.vae_quality import vae_readback

SCRIPTS = "examples/shapes_world/scripts"  # the read-back and latent-probe scripts, run from where they live


class IdentityVAE(nn.Module):
    """encode/decode that return their input: a lossless 'VAE'."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return SimpleNamespace(sample=z)


def test_lossless_vae_reads_back_everything():
    result = vae_readback(IdentityVAE(), num=12, seed=3, batch_size=5, progress=False)
    assert result["all"] == 1.0 and result["colour"] == 1.0 and result["motion"] == 1.0
    assert result["psnr"] == float("inf")


def test_blanking_vae_loses_the_objects():
    class Blank(IdentityVAE):  # every pixel becomes the background colour of the first pixel
        def decode(self, z):
            return SimpleNamespace(sample=z[:, :, :1, :1, :1].expand_as(z))

    result = vae_readback(Blank(), num=12, seed=3, progress=False)
    assert result["background"] == 1.0 and result["colour"] == 0.0 and result["all"] == 0.0
    assert 0 < result["psnr"] < 30


def test_script_writes_json(tmp_path):
    main = runpy.run_path(f"{SCRIPTS}/eval_shapes_vae.py")["main"]

    out = tmp_path / "vae.json"
    assert main(["--vae", "tiny", "--num", "3", "--batch-size", "2", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num"] == 3 and 0.0 <= result["all"] <= 1.0 and result["psnr"] > 0


def _synthetic_latents(records, informative: bool) -> torch.Tensor:
    """(N, 5, 2, 4, 4) latents: a one-hot shape and size at the object's cell and its centre as two constant
    planes when `informative`, noise alone otherwise."""
    from t2v.data.shapes import SHAPES, SIZES

    generator = torch.Generator().manual_seed(0)
    latents = 0.1 * torch.randn(len(records), 7, 2, 4, 4, generator=generator)
    if informative:
        for i, record in enumerate(records):
            obj = record["objects"][0]
            cx, cy = obj["start"]
            latents[i, SHAPES.index(obj["shape"]), :, cy // 16, cx // 16] += 1.0
            latents[i, 3 + list(SIZES).index(obj["size"]), :, cy // 16, cx // 16] += 1.0
            latents[i, 5] += cx / 64
            latents[i, 6] += cy / 64
    return latents


def test_latent_probe_reads_what_the_latents_keep_and_nothing_else():
    import numpy as np

    from t2v.data.shapes import sample_record

    probe = runpy.run_path(f"{SCRIPTS}/probe_vae_latents.py")["probe"]

    rng = np.random.default_rng(0)
    records = [sample_record(rng, 1, "train") for _ in range(300)]
    kept = probe(_synthetic_latents(records, True), records, epochs=15)
    lost = probe(_synthetic_latents(records, False), records, epochs=15)
    print("probe, informative latents:", kept, "\nprobe, noise:", lost)
    assert kept["shape_accuracy"] > 0.9 and kept["size_accuracy"] > 0.9 and kept["position_mae_x"] < 3
    assert lost["shape_accuracy"] < 0.6 and lost["size_accuracy"] < 0.75 and lost["position_mae_x"] > 5


def test_latent_probe_script_writes_json(tmp_path):
    main = runpy.run_path(f"{SCRIPTS}/probe_vae_latents.py")["main"]

    out = tmp_path / "probe.json"
    assert main(["--vae", "tiny", "--num", "20", "--epochs", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["clips"] == 20 and 0.0 <= result["shape_accuracy"] <= 1.0 and result["position_mae_x"] >= 0

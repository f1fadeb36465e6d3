"""VAE read-back bound: a perfect autoencoder reads back 100%, a random one does not, and the script writes JSON."""

import json
from types import SimpleNamespace

import torch
from torch import nn

from t2v.eval.vae_quality import vae_readback


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
    from scripts.eval_shapes_vae import main

    out = tmp_path / "vae.json"
    assert main(["--vae", "tiny", "--num", "3", "--batch-size", "2", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num"] == 3 and 0.0 <= result["all"] <= 1.0 and result["psnr"] > 0

"""diffusers video VAEs wherever a VAE goes: normalisation and decode as each class's own pipeline does them,
sampling, training on a VAE folder, precompute; refused classes name what they lack; int patch sizes (CPU, tiny).
"""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    CogVideoXPipeline,
    LTXPipeline,
)
from helpers import tiny_dit, tiny_pipeline, tiny_vae, tiny_wan_vae

from t2v.flow import num_tokens, patch_dims
from t2v.models.loading import load_vae
from t2v.models.vae_utils import (
    check_clip_shape,
    denormalize_latents,
    latent_shape,
    normalize_latents,
    vae_format,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny_cogvideox():
    torch.manual_seed(0)  # 3 blocks: 4x in time and space
    return AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                  up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
                                  norm_num_groups=2).eval()


def tiny_hunyuan_video():
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8),
                                     down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                     up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                     norm_num_groups=4, spatial_compression_ratio=4).eval()


def tiny_ltx_video(timestep_conditioning: bool = False):
    torch.manual_seed(0)  # 2 spatio-temporal downsamplings: 4x in time and space
    vae = AutoencoderKLLTXVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1, scaling_factor=0.7,
                                timestep_conditioning=timestep_conditioning).eval()
    with torch.no_grad():  # statistics live in buffers, saved with the weights
        vae.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        vae.latents_std.copy_(torch.tensor([1.5, 0.8, 1.0, 2.0]))
    return vae


def tiny_mochi():
    torch.manual_seed(0)  # 6x in time, 8x in space; group norms of 32 groups need 32 channels
    return AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                              latent_channels=4, layers_per_block=(1,) * 5, latents_mean=(0.1, -0.2, 0.0, 0.3),
                              latents_std=(1.5, 0.8, 1.0, 2.0), scaling_factor=0.7).eval()


def _config_stats(vae):
    shape = (1, -1, 1, 1, 1)
    return torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)


def _cogvideox_decode(vae, latents):  # CogVideoXPipeline.decode_latents itself; it takes (B, T, C, H, W)
    pipe = SimpleNamespace(vae=vae, vae_scaling_factor_image=vae.config.scaling_factor)
    return CogVideoXPipeline.decode_latents(pipe, latents.permute(0, 2, 1, 3, 4))


def _hunyuan_decode(vae, latents):  # HunyuanVideoPipeline.__call__, stage "decode"
    return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


def _ltx_decode(vae, latents):  # LTXPipeline.__call__ without timestep conditioning
    z = LTXPipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    return vae.decode(z, return_dict=False)[0]


def _mochi_decode(vae, latents):  # MochiPipeline.__call__
    mean, std = _config_stats(vae)
    return vae.decode(latents * std / vae.config.scaling_factor + mean, return_dict=False)[0]


def _wan_decode(vae, latents):  # WanPipeline.__call__
    mean, std = _config_stats(vae)
    return vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]


# name: (tiny VAE, the class's own pipeline decode of normalised latents, frames per latent step of a clip)
VAES = {
    "cogvideox": (tiny_cogvideox, _cogvideox_decode, 8),  # latent frames after the first in pairs: 8k + 1
    "hunyuan_video": (tiny_hunyuan_video, _hunyuan_decode, 4),
    "ltx_video": (tiny_ltx_video, _ltx_decode, 4),
    "mochi": (tiny_mochi, _mochi_decode, 6),
    "wan": (tiny_wan_vae, _wan_decode, 4),  # 2x in time, but the encoder takes frames in chunks of 4
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from t2v.data.shapes import write_dataset

    return str(write_dataset(tmp_path_factory.mktemp("clips"), num=2, seed=0))


@pytest.fixture(scope="module")
def precompute():
    spec = importlib.util.spec_from_file_location("precompute", ROOT / "scripts" / "precompute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", VAES)
def test_normalisation_and_decode_are_the_class_pipelines(name):
    make, pipeline_decode, step = VAES[name]
    vae = make()
    fmt = vae_format(vae)
    frames, size = 1 + step, 2 * fmt.spatial
    assert latent_shape(vae, frames, size, size) == (4, 1 + step // fmt.temporal, 2, 2)
    with pytest.raises(ValueError, match=f"num_frames {1 + step // 2} must be {step}k\\+1"):
        latent_shape(vae, 1 + step // 2, size, size)

    video = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()  # (1, 4, T', 2, 2)
        x = normalize_latents(vae, z)
        torch.testing.assert_close(denormalize_latents(vae, x), z)
        ours = vae.decode(denormalize_latents(vae, x), return_dict=False)[0]
        theirs = pipeline_decode(vae, x)
    assert ours.shape == (1, 3, frames, size, size)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # rounding apart: 1 / s * z against z / s
    if name == "cogvideox":  # diffusers' CogVideoX trainers: latent_dist.sample() * scaling_factor
        torch.testing.assert_close(x, z * vae.config.scaling_factor)
    if name == "ltx_video":
        torch.testing.assert_close(x, LTXPipeline._normalize_latents(z, vae.latents_mean, vae.latents_std, 0.7))


@pytest.mark.parametrize("name", VAES)
def test_pipeline_samples_with_the_vae(name):
    make, _, step = VAES[name]
    pipe = tiny_pipeline(vae=make())
    pipe.set_progress_bar_config(disable=True)
    size = 2 * vae_format(pipe.vae).spatial * 2  # two patches of two latent pixels
    out = pipe("a red circle", num_frames=1 + step, height=size, width=size, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.frames.shape == (1, 1 + step, size, size, 3) and out.frames.min() >= 0 and out.frames.max() <= 1


@pytest.mark.parametrize("name", [n for n in VAES if n != "wan"])  # Wan: tests/test_train.py
def test_trainer_trains_on_a_vae_folder(tmp_path, manifest, name):
    from pipelines import T2VPipeline
    from t2v.config import load_config
    from t2v.train import trainer
    from t2v.train.dit_task import DiTTask
    from t2v.train.logger import read_metrics

    make, _, step = VAES[name]
    vae = make()
    vae.save_pretrained(tmp_path / "vae")
    size = 4 * vae_format(vae).spatial
    cfg = load_config(str(ROOT / "configs" / "train" / "debug.yaml"), [
        f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", f"model.vae={tmp_path / 'vae'}",
        "train.max_steps=2", f"data.frames={1 + step}", f"data.height={size}", f"data.width={size}"])
    task = DiTTask(cfg)
    assert type(task.vae) is type(vae)
    trainer.train(cfg, task)
    losses = [row["loss"] for row in read_metrics(str(tmp_path / "run")) if "loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)
    model_index = json.loads((tmp_path / "run" / "pipeline" / "model_index.json").read_text())
    assert model_index["vae"] == ["diffusers", type(vae).__name__]
    pipe = T2VPipeline.from_pretrained(tmp_path / "run" / "pipeline")  # the exported pipeline samples its clips
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.frames.shape == (1, 1 + step, 3, size, size)


@pytest.mark.parametrize("name", VAES)
def test_precompute_writes_a_cache_with_the_vae(tmp_path, manifest, precompute, name):
    from t2v.data.cache import LatentCache

    make, _, step = VAES[name]
    vae = make()
    vae.save_pretrained(tmp_path / "vae")
    size = 2 * vae_format(vae).spatial
    precompute.main(["--manifest", manifest, "--vae", str(tmp_path / "vae"), "--text-encoder", "tiny-random",
                     "--out", str(tmp_path / "cache"), "--frames", str(1 + step), "--height", str(size),
                     "--width", str(size), "--num-workers", "0", "--max-length", "8"])
    cache = LatentCache(str(tmp_path / "cache"))
    assert len(cache) == 2 and cache.skipped == {}
    sample = cache.row(0)
    expected = latent_shape(vae, 1 + step, size, size)  # (4, T', 2, 2)
    assert sample["latent_mean"].shape == expected == sample["latent_logvar"].shape


def test_precompute_text_encoder_dtype(tmp_path, manifest, precompute, capsys):
    """--text-encoder-dtype runs the encoder in bf16 (the cache records another text fingerprint); fp16 is
    refused on the CPU as model.text_encoder_dtype=fp16 is."""
    from t2v.data.cache import LatentCache
    from t2v.models.text_encoder import TextEmbedder, text_encoder_dtype

    tiny_vae().save_pretrained(tmp_path / "vae")
    texts, fingerprints = {}, {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        precompute.main(["--manifest", manifest, "--vae", str(tmp_path / "vae"), "--text-encoder", "tiny-random",
                         "--out", str(out), "--frames", "5", "--height", "16", "--width", "16", "--num-workers",
                         "0", "--max-length", "8", "--dtype", "fp32", "--text-encoder-dtype", dtype])
        cache = LatentCache(str(out))
        texts[dtype], fingerprints[dtype] = cache.row(0)["text_states"], cache.fingerprint
    assert not torch.equal(texts["fp32"], texts["bf16"])
    torch.testing.assert_close(texts["bf16"], texts["fp32"], rtol=0.05, atol=0.05)
    assert fingerprints["fp32"].text_encoder != fingerprints["bf16"].text_encoder
    # What a run with model.text_encoder_dtype=bf16 expects of the cache (DiTTask's text embedder).
    bf16 = TextEmbedder.from_pretrained("tiny-random", max_length=8, dtype=text_encoder_dtype("bf16", "cpu"))
    assert bf16.fingerprint() == fingerprints["bf16"].text_encoder
    assert fingerprints["fp32"].vae == fingerprints["bf16"].vae

    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit) as exit_info:
        precompute.main(["--manifest", manifest, "--vae", str(tmp_path / "vae"), "--text-encoder", "tiny-random",
                         "--out", str(tmp_path / "fp16"), "--frames", "5", "--height", "16", "--width", "16",
                         "--text-encoder-dtype", "fp16"])
    assert exit_info.value.code == 2
    assert "float16 text encoder cannot run on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "fp16").exists()


def test_vaes_refused_name_the_class_and_what_is_missing(tmp_path, manifest, precompute, capsys):
    from t2v.config import load_config
    from t2v.train.dit_task import DiTTask

    # A class with no description is refused by name before any weight is read.
    (tmp_path / "allegro").mkdir()
    (tmp_path / "allegro" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLAllegro"}))
    with pytest.raises(ValueError, match="VAE class AutoencoderKLAllegro is not one T2V can use.*known: Causal"):
        load_vae(str(tmp_path / "allegro"), seed=0)
    with pytest.raises(SystemExit):
        precompute.main(["--manifest", manifest, "--vae", str(tmp_path / "allegro"), "--text-encoder",
                         "tiny-random", "--out", str(tmp_path / "cache"), "--frames", "5", "--height", "16",
                         "--width", "16"])
    assert "precompute.py: error: VAE folder" in capsys.readouterr().err
    # LTX-Video 0.9.1+ decodes at a timestep with noise, which T2VPipeline has no setting for: its latents are
    # cached, but sampling and training (validation, the exported pipeline) are refused up front.
    ltx = tiny_ltx_video(timestep_conditioning=True)
    ltx.save_pretrained(tmp_path / "ltx")
    precompute.main(["--manifest", manifest, "--vae", str(tmp_path / "ltx"), "--text-encoder", "tiny-random",
                     "--out", str(tmp_path / "cache"), "--frames", "5", "--height", "16", "--width", "16",
                     "--num-workers", "0", "--max-length", "8"])
    with pytest.raises(ValueError, match="AutoencoderKLLTXVideo with timestep_conditioning=True"):
        DiTTask(load_config(str(ROOT / "configs" / "train" / "debug.yaml"), [
            f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", f"model.vae={tmp_path / 'ltx'}"]))
    pipe = tiny_pipeline(vae=ltx)
    with pytest.raises(ValueError, match="timestep_conditioning=True.*T2VPipeline has no setting"):
        pipe("a red circle", num_frames=5, height=16, width=16)
    # CogVideoX takes 8k+1 frames: 5 would decode to 8.
    with pytest.raises(ValueError, match="num_frames 5 must be 8k\\+1 .*AutoencoderKLCogVideoX decodes"):
        latent_shape(tiny_cogvideox(), 5, 16, 16)


def test_int_patch_size_is_spatial(tmp_path):
    """An int patch size p (CogVideoX's configs) means (1, p, p) in the DiT, the token count and the clip checks."""
    from t2v.models.dit import VideoDiT

    assert patch_dims(2) == (1, 2, 2) and patch_dims([2, 2, 2]) == (2, 2, 2)
    assert num_tokens((3, 4, 6), 2) == 3 * 2 * 3 == num_tokens((3, 4, 6), (1, 2, 2))
    with pytest.raises(ValueError, match="patch size 2"):
        check_clip_shape(tiny_vae(), 2, 5, 6, 8)
    dit = tiny_dit(patch_size=2)
    assert tuple(dit.config.patch_size) == (1, 2, 2)
    dit.save_pretrained(tmp_path / "dit")
    assert tuple(VideoDiT.from_pretrained(tmp_path / "dit").config.patch_size) == (1, 2, 2)
    pipe = tiny_pipeline(patch_size=2)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent")
    assert out.frames.shape == (1, 4, 3, 4, 4)

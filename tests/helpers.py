"""Tiny components shared by the pipeline, generation and training tests."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from omegaconf import OmegaConf

from t2v.models.presets import PRESET_DIR as CONFIGS
from t2v.models.text_encoder import TINY_RANDOM, load_text_encoder


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(f"{CONFIGS}/{name}.yaml"))


def tiny_vae():
    from t2v.models.vae import CausalVideoVAE

    torch.manual_seed(0)
    return CausalVideoVAE.from_config(preset("vae_tiny")).eval()


def tiny_dit(perturb: bool = True, **overrides):
    from t2v.models.dit import VideoDiT

    torch.manual_seed(0)
    config = {**preset("dit_tiny"), **overrides}
    model = VideoDiT.from_config(config).eval()
    if perturb:  # zero-initialised gates and output layer would make every video identical
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_pipeline(vae=None, **dit_overrides):
    from pipelines import T2VPipeline

    tokenizer, text_encoder = load_text_encoder(TINY_RANDOM)
    vae = vae if vae is not None else tiny_vae()
    dit = tiny_dit(text_dim=text_encoder.config.hidden_size, pooled_dim=text_encoder.config.hidden_size,
                   in_channels=_latent_channels(vae), **dit_overrides)
    ft, fs = _factors(vae)
    pt, ph, pw = dit.config.patch_size
    defaults = {"num_frames": 2 * ft + 1, "height": 2 * fs * ph, "width": 2 * fs * pw, "num_inference_steps": 2,
                "guidance_scale": 3.0, "fps": 8}
    return T2VPipeline(
        vae=vae,
        transformer=dit,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        max_sequence_length=16,
        generation_defaults=defaults,
    )


def _factors(vae):
    from t2v.models.vae_utils import vae_scale_factors

    return vae_scale_factors(vae)


def _latent_channels(vae):
    from t2v.models.vae_utils import latent_channels

    return latent_channels(vae)


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                            temperal_downsample=[True], attn_scales=[], scale_factor_temporal=2,
                            scale_factor_spatial=2, latents_mean=[0.1, -0.2, 0.0, 0.3],
                            latents_std=[1.5, 0.8, 1.0, 2.0]).eval()

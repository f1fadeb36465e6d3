from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from t2v.models.presets import PRESET_DIR
from t2v.models.vae import CausalVideoVAE, ChannelRMSNorm

CONFIGS = PRESET_DIR


def load_preset(name: str) -> CausalVideoVAE:
    return CausalVideoVAE.from_config(OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml")))


def tiny_vae_4x(upsample_to_next_width: bool = False) -> CausalVideoVAE:
    """Tiny model with the real 4x temporal compression (and 4x spatial)."""
    torch.manual_seed(0)
    return CausalVideoVAE(
        latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1, temporal_downsample=(True, True),
        upsample_to_next_width=upsample_to_next_width,
    ).eval()


def video(batch: int, frames: int, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1


@pytest.mark.parametrize("frames, latent_frames", [(1, 1), (5, 2), (17, 5)])
def test_shapes(frames, latent_frames):
    vae = tiny_vae_4x()
    assert vae.spatial_compression_ratio == 4 and vae.temporal_compression_ratio == 4
    with torch.no_grad():
        posterior = vae.encode(video(2, frames, 16)).latent_dist
        assert posterior.mean.shape == (2, 4, latent_frames, 4, 4)
        assert posterior.logvar.shape == (2, 4, latent_frames, 4, 4)
        sample = vae.decode(posterior.mode()).sample
    assert sample.shape == (2, 3, frames, 16, 16)
    assert torch.isfinite(sample).all()


@pytest.mark.parametrize("upsample_to_next_width", [False, True])
def test_encoder_and_decoder_are_causal(upsample_to_next_width):
    vae = tiny_vae_4x(upsample_to_next_width)
    x = video(1, 17, 16)
    for framewise in (True, False):
        vae.use_framewise_encoding = vae.use_framewise_decoding = framewise
        with torch.no_grad():
            z_all = vae.encode(x).latent_dist.mean
            z_head = vae.encode(x[:, :, :9]).latent_dist.mean
            y_all = vae.decode(z_all).sample
            y_head = vae.decode(z_all[:, :, :3]).sample
        assert z_head.shape[2] == 3
        assert (z_head - z_all[:, :, :3]).abs().max() < 1e-4
        assert (y_head - y_all[:, :, :9]).abs().max() < 1e-4
        # and the last frames do change the last latent (the test above is not vacuous)
        x_changed = x.clone()
        x_changed[:, :, -1] = 0.0
        with torch.no_grad():
            z_changed = vae.encode(x_changed).latent_dist.mean
        assert (z_changed[:, :, :4] - z_all[:, :, :4]).abs().max() < 1e-4
        assert (z_changed[:, :, 4] - z_all[:, :, 4]).abs().max() > 1e-3


@pytest.mark.parametrize("upsample_to_next_width", [False, True])
def test_chunked_matches_one_shot(upsample_to_next_width):
    vae = tiny_vae_4x(upsample_to_next_width)
    x = video(2, 17, 16)
    with torch.no_grad():
        vae.use_framewise_encoding = vae.use_framewise_decoding = True
        moments_chunked = vae.encode(x).latent_dist.parameters
        sample_chunked = vae.decode(moments_chunked[:, :4]).sample
        vae.use_framewise_encoding = vae.use_framewise_decoding = False
        moments_once = vae.encode(x).latent_dist.parameters
        sample_once = vae.decode(moments_once[:, :4]).sample
    assert (moments_chunked - moments_once).abs().max() < 1e-4
    assert (sample_chunked - sample_once).abs().max() < 1e-4


def test_tiled_close_to_one_shot():
    # Tiles of 64 px every 32 px (half-tile overlap) on a 96 px, 3-frame video. Tiling is approximate: near tile
    # borders a tile sees zero padding instead of its neighbour's pixels. Stated tolerance for the
    # random-init tiny model (outputs of mean magnitude ~0.5): mean abs diff < 0.02.
    torch.manual_seed(0)
    vae = load_preset("vae_tiny").eval()
    x = video(1, 3, 96)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
        vae.enable_tiling(64, 64, 32, 32)
        z_tiled = vae.encode(x).latent_dist.mean
        y_tiled = vae.decode(z).sample
    assert z_tiled.shape == z.shape and y_tiled.shape == y.shape
    assert 0 < (z_tiled - z).abs().mean() < 0.02
    assert 0 < (y_tiled - y).abs().mean() < 0.02
    vae.disable_tiling()
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, y)


def test_enable_tiling_rejects_bad_sizes():
    vae = load_preset("vae_tiny")
    with pytest.raises(ValueError, match="tile_sample_min_height=33"):
        vae.enable_tiling(tile_sample_min_height=33)
    with pytest.raises(ValueError, match="tile_sample_stride_width=80"):
        vae.enable_tiling(64, 64, 32, 80)


def test_slicing_matches_batch():
    vae = tiny_vae_4x()
    x = video(3, 5, 16)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
        vae.enable_slicing()
        z_sliced = vae.encode(x).latent_dist.mean
        y_sliced = vae.decode(z).sample
    vae.disable_slicing()
    assert (z_sliced - z).abs().max() < 1e-5
    assert (y_sliced - y).abs().max() < 1e-5


def test_gradient_checkpointing_same_grads():
    vae = tiny_vae_4x().train()
    x = video(2, 5, 16)

    def grads():
        vae.zero_grad(set_to_none=True)
        out = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample
        (out - x).pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in vae.named_parameters()}

    reference = grads()
    vae.enable_gradient_checkpointing()
    assert vae.is_gradient_checkpointing
    checkpointed = grads()
    vae.disable_gradient_checkpointing()
    assert reference.keys() == checkpointed.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert any(grad.abs().sum() > 0 for grad in reference.values())


def test_bad_inputs_raise():
    vae = tiny_vae_4x()
    with pytest.raises(ValueError, match="frame count 4"):
        vae.encode(video(1, 4, 16))
    with pytest.raises(ValueError, match="frame size 18x18"):
        vae.encode(video(1, 5, 18))
    with pytest.raises(ValueError, match="latent of shape"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="temporal_downsample"):
        CausalVideoVAE(block_out_channels=(8, 16), temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="latent_channels=0"):
        CausalVideoVAE(latent_channels=0, block_out_channels=(8,), temporal_downsample=())


def test_save_load_round_trip(tmp_path):
    vae = load_preset("vae_tiny").eval()
    vae.save_pretrained(tmp_path)
    loaded = CausalVideoVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.block_out_channels == vae.config.block_out_channels
    x = video(1, 5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, vae(x).sample)


def test_upsample_to_next_width_layout(tmp_path):
    from t2v.models.vae import ResBlock, Upsample

    for flag in (False, True):
        vae = tiny_vae_4x(flag)
        ups = [b for b in vae.decoder.blocks if isinstance(b, Upsample)]
        # widths (8, 8, 16) reversed: 16 -> 8 -> 8; the first upsampling is where the option differs
        assert [u.spatial.out_channels for u in ups] == ([8, 8] if flag else [16, 8])
        changing = [b for b in vae.decoder.blocks if isinstance(b, ResBlock) and not isinstance(b.shortcut, torch.nn.Identity)]
        assert len(changing) == (0 if flag else 1)  # no res block left that projects its shortcut
        with torch.no_grad():
            assert vae.decode(torch.randn(1, 4, 2, 4, 4)).sample.shape == (1, 3, 5, 16, 16)
    vae.save_pretrained(tmp_path)
    loaded = CausalVideoVAE.from_pretrained(tmp_path)
    assert loaded.config.upsample_to_next_width is True
    assert loaded.decoder.state_dict().keys() == vae.decoder.state_dict().keys()


def test_presets():
    tiny = load_preset("vae_tiny")
    assert (tiny.spatial_compression_ratio, tiny.temporal_compression_ratio) == (2, 2)
    with torch.device("meta"):  # real-scale: check the architecture without allocating weights
        base = load_preset("vae_base")
    assert (base.spatial_compression_ratio, base.temporal_compression_ratio) == (8, 4)
    assert base.config.latent_channels == 16

    shapes = load_preset("vae_shapes").eval()
    assert 1e6 < sum(p.numel() for p in shapes.parameters()) < 3e6
    with torch.no_grad():
        z = shapes.encode(video(1, 17, 64)).latent_dist.sample(generator=torch.Generator().manual_seed(0))
        assert z.shape == (1, 16, 5, 8, 8)
        assert shapes.decode(z).sample.shape == (1, 3, 17, 64, 64)


def test_bf16_autocast_training_step():
    vae = load_preset("vae_tiny").train()
    x = video(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        posterior = vae.encode(x).latent_dist
        out = vae.decode(posterior.sample()).sample
        loss = (out.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


def test_decoder_widths_of_its_own(tmp_path):
    import runpy

    scripts = Path(__file__).resolve().parents[1] / "examples" / "shapes_world" / "scripts"
    new_decoder_main = runpy.run_path(str(scripts / "new_vae_decoder.py"))["main"]
    same_latent_space = runpy.run_path(str(scripts / "ship_default.py"))["same_latent_space"]

    torch.manual_seed(0)
    vae = CausalVideoVAE(latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1,
                         temporal_downsample=(True, True), mid_attention=True).eval()
    for module in vae.decoder.modules():  # trained-looking norm gains, so their rescaling is tested
        if hasattr(module, "weight") and module.weight.ndim == 1:
            module.weight.data.uniform_(0.5, 1.5)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "wide"
    assert new_decoder_main(["--vae", str(tmp_path / "vae"), "--widths", "16,16,32", "--layers", "2",
                             "--out", str(out)]) == 0
    wide = CausalVideoVAE.from_pretrained(out).eval()
    assert wide.config.decoder_block_out_channels == [16, 16, 32] and wide.config.decoder_layers_per_block == 2
    random = tmp_path / "random"
    assert new_decoder_main(["--vae", str(tmp_path / "vae"), "--widths", "16,16,32", "--layers", "2",
                             "--init", "random", "--out", str(random)]) == 0
    # the encoder and so the latents are the trained VAE's; the decoder is new and larger
    for name, value in vae.encoder.state_dict().items():
        assert torch.equal(wide.encoder.state_dict()[name], value), name
    assert sum(p.numel() for p in wide.decoder.parameters()) > 2 * sum(p.numel() for p in vae.decoder.parameters())
    x = video(2, 17, 16)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert torch.equal(wide.encode(x).latent_dist.mode(), z)
        # grown, the decoder starts as the old one (chunked and one-shot); a random one does not. The RMS norms'
        # eps is not rescaled with the channel count, so compare the algebra with eps 0 (real scale: 9e-5 of 1.5)
        for module in [*vae.modules(), *wide.modules()]:
            if isinstance(module, ChannelRMSNorm):
                module.eps = 0.0
        for framewise in (True, False):
            vae.use_framewise_decoding = wide.use_framewise_decoding = framewise
            torch.testing.assert_close(wide.decode(z).sample, vae.decode(z).sample, rtol=1e-4, atol=1e-4)
        fresh = CausalVideoVAE.from_pretrained(random).eval()
        assert (fresh.decode(z).sample - vae.decode(z).sample).abs().max() > 0.1
    assert same_latent_space(vae, wide, str(out)) is wide
    # the grown decoder trains: its new channels get gradient at once
    wide.train()
    wide.decode(z).sample.square().mean().backward()
    assert wide.decoder.conv_in.weight.grad[8:].abs().sum() > 0  # rows writing into the added channels
    # a decoder fine-tune keeps its widths through a save / load
    wide.save_pretrained(tmp_path / "again")
    assert CausalVideoVAE.from_pretrained(tmp_path / "again").decoder.state_dict().keys() == wide.decoder.state_dict().keys()


def test_grow_rejects_a_narrower_decoder():
    import runpy

    with_new_decoder = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "shapes_world"
                                          / "scripts" / "new_vae_decoder.py"))["with_new_decoder"]

    with pytest.raises(ValueError, match=r"widths \[8, 8, 8\] x 1 must be at least"):
        with_new_decoder(tiny_vae_4x(), [8, 8, 8], 1, seed=0)


def test_decoder_widths_must_match_the_levels():
    with pytest.raises(ValueError, match=r"decoder_block_out_channels=\(8, 16\) must list 3"):
        CausalVideoVAE(block_out_channels=(8, 8, 16), temporal_downsample=(True, True), decoder_block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="decoder_layers_per_block=0"):
        CausalVideoVAE(block_out_channels=(8,), temporal_downsample=(), decoder_layers_per_block=0)

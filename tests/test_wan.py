"""Wan 2.1 transformers as VideoDiT: forward equality, bit-exact conversion both ways, the script, and the
shipped model unchanged by the Wan switches (tiny random Wan transformers built as diffusers' tests do)."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from safetensors.torch import load_file

import t2v
from t2v.models.dit import VideoDiT, default_rope_axes_dim, rope_3d
from t2v.models.wan import (
    config_from_wan,
    state_dict_from_wan,
    state_dict_to_wan,
    transformer_from_wan,
    transformer_to_wan,
)

# diffusers' WanPipeline test components and WanTransformer3DModel test config, then tiny models shaped like
# the real 1.3B (12 heads, ffn 5.83 x dim) and 14B (40 heads, ffn 2.7 x dim), and Wan's other switches.
DIFFUSERS_PIPELINE = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)  # fmt: skip
TINY_WAN = {
    "diffusers_pipeline": DIFFUSERS_PIPELINE,
    "diffusers_model": {**DIFFUSERS_PIPELINE, "in_channels": 4, "out_channels": 4, "text_dim": 16},
    "1.3b_like": {**DIFFUSERS_PIPELINE, "num_attention_heads": 3, "attention_head_dim": 8, "ffn_dim": 140},
    "14b_like": {**DIFFUSERS_PIPELINE, "num_attention_heads": 4, "attention_head_dim": 8, "ffn_dim": 86,
                 "num_layers": 3},
    "no_cross_attn_norm_patch_222": {**DIFFUSERS_PIPELINE, "cross_attn_norm": False, "patch_size": (2, 2, 2),
                                     "freq_dim": 16, "qk_norm": None},
}  # fmt: skip

# The transformer configs of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-T2V-14B-Diffusers.
REAL_WAN = {
    name: {
        "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
        "cross_attn_norm": True, "eps": 1e-06, "freq_dim": 256, "image_dim": None, "in_channels": 16,
        "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 1024, "text_dim": 4096, **sizes,
    }
    for name, sizes in {
        "1.3B": {"num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960},
        "14B": {"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824},
    }.items()
}  # fmt: skip


def tiny_wan(config: dict, seed: int = 0) -> WanTransformer3DModel:
    """A tiny Wan transformer with every tensor random (norm weights too, so a swapped norm would show)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def wan_inputs(config: dict, seed: int = 0) -> dict:
    """Latents, timesteps and text states whose second row is zero-padded after 5 of 9 tokens, as Wan pads."""
    gen = torch.Generator().manual_seed(seed)
    p_t = config["patch_size"][0]
    text = torch.randn(2, 9, config["text_dim"], generator=gen)
    text[1, 5:] = 0
    return dict(
        hidden_states=torch.randn(2, config["in_channels"], 3 * p_t, 8, 6, generator=gen),
        timestep=torch.tensor([999, 31]),
        encoder_hidden_states=text,
    )


def max_diff_to_wan(wan: WanTransformer3DModel, ours: VideoDiT, inputs: dict) -> float:
    mask = inputs["encoder_hidden_states"].ne(0).any(-1)  # (B, L): the padding a text encoder would report
    with torch.no_grad():
        expected = wan(**inputs).sample
        actual = ours(**inputs, encoder_attention_mask=mask).sample
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item()


def assert_same_state(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


# ----------------------------------------------------------------------------------------------------
# Equality with Wan
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY_WAN))
def test_converted_transformer_equals_wan(name):
    config = TINY_WAN[name]
    wan = tiny_wan(config)
    ours = transformer_from_wan(wan)
    assert isinstance(ours, VideoDiT) and not ours.config.mask_text_padding
    assert max_diff_to_wan(wan, ours, wan_inputs(config)) <= 1e-5
    # Wan attends to its zero padding: the same model masking it differs.
    masking = VideoDiT.from_config({**ours.config, "mask_text_padding": True})
    masking.load_state_dict(ours.state_dict())
    assert max_diff_to_wan(wan, masking, wan_inputs(config)) > 1e-3


@pytest.mark.parametrize("name", list(TINY_WAN))
def test_conversion_back_is_bit_exact(name):
    config = TINY_WAN[name]
    wan = tiny_wan(config)
    state = wan.state_dict()
    assert_same_state(state_dict_to_wan(state_dict_from_wan(state), config["patch_size"]), state)

    ours = transformer_from_wan(wan)
    back = transformer_to_wan(ours, rope_max_seq_len=config["rope_max_seq_len"])
    assert_same_state(back.state_dict(), state)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == {**public(wan.config), "qk_norm": "rms_norm_across_heads"}
    # Copies, not views: training the converted model leaves the source alone.
    pointers = lambda m: {p.untyped_storage().data_ptr() for p in m.parameters()}  # noqa: E731
    assert not pointers(ours) & pointers(wan) and not pointers(back) & pointers(ours)


@pytest.mark.parametrize("name", list(REAL_WAN))
def test_real_configs_give_the_same_parameter_count(name):
    config = REAL_WAN[name]
    with torch.device("meta"):
        wan = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = VideoDiT(**config_from_wan(config))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in wan.parameters())
    assert count == {"1.3B": 1_418_996_800, "14B": 14_288_491_584}[name]
    assert ours.config.hidden_size == {"1.3B": 1536, "14B": 5120}[name]


def test_rope_tables():
    """Default tables are the float32 ones our models were trained with; `rope_float64` gives Wan's."""
    grid, head_dim, theta = (3, 5, 7), 128, 10000.0
    axes = default_rope_axes_dim(head_dim)
    cos, sin = rope_3d(grid, axes, theta, torch.device("cpu"))
    angles = []
    for axis, (size, dim) in enumerate(zip(grid, axes)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        angle = torch.outer(torch.arange(size, dtype=torch.float32), freqs)
        angles.append(angle.view(shape).expand(*grid, -1))
    angles = torch.cat(angles, dim=-1).flatten(0, 2)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())

    wan_rope = WanRotaryPosEmbed(head_dim, (1, 1, 1), 32)
    wan_cos, wan_sin = wan_rope(torch.zeros(1, 1, *grid))  # each (1, N, 1, head_dim), pairs repeated
    cos, sin = rope_3d(grid, axes, theta, torch.device("cpu"), float64=True)
    assert torch.equal(cos, wan_cos[0, :, 0, 0::2]) and torch.equal(sin, wan_sin[0, :, 0, 1::2])


# ----------------------------------------------------------------------------------------------------
# Our models are unchanged
# ----------------------------------------------------------------------------------------------------


def test_shipped_transformer_output_unchanged():
    """The shipped transformer's output on fixed inputs, saved before the Wan switches existed.

    Bit-identical on the CPU that wrote the fixture; the tolerance leaves room for other CPUs' kernels only.
    """
    fixture = load_file("tests/fixtures/shipped_transformer_output.safetensors")
    model = VideoDiT.from_pretrained(t2v.DEFAULT_MODEL, subfolder="transformer", torch_dtype=torch.float32)
    stored = load_file(f"{t2v.DEFAULT_MODEL}/transformer/diffusion_pytorch_model.safetensors")
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in stored.items()}
    with torch.no_grad():
        out = model(fixture["latents"], fixture["timestep"], fixture["text"], fixture["mask"],
                    fixture["pooled"]).sample  # fmt: skip
    torch.testing.assert_close(out, fixture["output"], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"final_modulation": "linear"}, "final_modulation"),
        ({"timestep_freq_dim": 255}, "timestep_freq_dim"),
        ({"timestep_freq_dim": 0}, "timestep_freq_dim"),
        ({"qk_norm": False, "qk_norm_across_heads": True}, "qk_norm"),
    ],
)
def test_bad_wan_switches_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        VideoDiT(hidden_size=24, num_layers=1, num_heads=2, text_dim=8, **overrides)


# ----------------------------------------------------------------------------------------------------
# Configs that do not convert
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"image_dim": 1280, "added_kv_proj_dim": 24}, "image_dim"),
        ({"window_size": [-1, -1]}, "window_size"),
        ({"qk_norm": "layer_norm"}, "qk_norm"),
        ({"_class_name": "CogVideoXTransformer3DModel"}, "CogVideoX"),
    ],
)
def test_config_from_wan_refuses(overrides, match):
    with pytest.raises(ValueError, match=match):
        config_from_wan({**DIFFUSERS_PIPELINE, **overrides})


def test_non_wan_video_dit_is_refused():
    ours = VideoDiT(hidden_size=24, num_layers=1, num_heads=2, text_dim=8)
    with pytest.raises(ValueError, match="final_modulation"):
        transformer_to_wan(ours)


# ----------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------


def convert(*argv: str) -> int:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from convert_wan import main

    return main(list(argv))


def test_convert_script_round_trip(tmp_path):
    """WanPipeline folder (sharded weights) -> VideoDiT folder -> Wan transformer folder, bit for bit."""
    config = TINY_WAN["14b_like"]
    wan = tiny_wan(config)
    wan.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="20KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    (tmp_path / "pipe" / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]})
    )

    assert convert("--src", str(tmp_path / "pipe"), "--out", str(tmp_path / "ours")) == 0
    ours = VideoDiT.from_pretrained(tmp_path / "ours")
    assert max_diff_to_wan(wan, ours, wan_inputs(config)) <= 1e-5

    assert convert("--src", str(tmp_path / "ours"), "--out", str(tmp_path / "back"), "--to", "wan",
                   "--rope-max-seq-len", "32") == 0  # fmt: skip
    back = WanTransformer3DModel.from_pretrained(tmp_path / "back")
    assert_same_state(back.state_dict(), wan.state_dict())
    assert back.config.rope_max_seq_len == 32


def test_convert_script_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert("--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert exit_info.value.code == 2 and "missing' is not a folder" in capsys.readouterr().err

    i2v = {**DIFFUSERS_PIPELINE, "image_dim": 16, "added_kv_proj_dim": 24}
    torch.manual_seed(0)
    WanTransformer3DModel(**i2v).save_pretrained(tmp_path / "i2v")
    with pytest.raises(SystemExit):
        convert("--src", str(tmp_path / "i2v"), "--out", str(tmp_path / "out"))
    assert "image_dim" in capsys.readouterr().err

    VideoDiT(hidden_size=24, num_layers=1, num_heads=2, text_dim=8).save_pretrained(tmp_path / "ours")
    with pytest.raises(SystemExit):
        convert("--src", str(tmp_path / "ours"), "--out", str(tmp_path / "out"))  # not a Wan folder
    assert "is for a VideoDiT, not a WanTransformer3DModel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert("--src", str(tmp_path / "ours"), "--out", str(tmp_path / "out"), "--to", "wan")
    assert "final_modulation" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

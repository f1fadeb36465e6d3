"""Wan 2.1 as t2v models: transformers as VideoDiT (forward equality, bit-exact conversion both ways), whole
WanPipeline folders as T2VPipeline (the same frames as WanPipeline), their text encoders, the script and
generate.py, and the shipped model unchanged by the Wan switches. Tiny random Wan components are built as
diffusers' own Wan tests build them."""

import json
import logging
import os
import shutil
import string
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from safetensors.torch import load_file

import t2v
from t2v.models.dit import FP32_MODULES, VideoDiT, default_rope_axes_dim, in_fp32_modules, rope_3d
from t2v.models.wan import (
    config_from_wan,
    state_dict_from_wan,
    state_dict_to_wan,
    transformer_from_wan,
    transformer_to_wan,
)
from t2v.pipelines import T2VPipeline

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


# Converted without `wan_precision`, the tiny models' bf16 outputs were 2e-2 to 4e-2 off Wan's bf16 outputs (as far
# as Wan's bf16 is off its fp32); with it, they are Wan's bit for bit on CPU. The tolerance is for other kernels.
BF16_TOLERANCE = 2e-3


def bf16_inputs(config: dict) -> dict:
    return {key: v.to(torch.bfloat16) if v.is_floating_point() else v for key, v in wan_inputs(config).items()}


def fp32_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.dtype == torch.float32}


@pytest.mark.parametrize("name", list(TINY_WAN))
def test_converted_transformer_in_bf16_computes_what_wan_computes(name, tmp_path):
    """In bf16 as diffusers loads Wan: what it keeps in float32 stays so, and the output is Wan's."""
    config = TINY_WAN[name]
    tiny_wan(config).save_pretrained(tmp_path)
    wan = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ours = transformer_from_wan(tmp_path, torch.bfloat16)
    assert ours.config.wan_precision
    assert_same_state(ours.state_dict(), state_dict_from_wan(wan.state_dict()))  # dtypes too
    assert fp32_names(ours) == {n for n, _ in ours.named_parameters() if in_fp32_modules(n, FP32_MODULES)} != set()
    assert max_diff_to_wan(wan, ours, bf16_inputs(config)) <= BF16_TOLERANCE
    # Cast with `.to`, a float32 model keeps the same tensors in float32; converted back, it is Wan's bf16 model.
    assert_same_state(transformer_from_wan(tiny_wan(config)).to(torch.bfloat16).state_dict(), ours.state_dict())
    assert_same_state(transformer_to_wan(ours, config["rope_max_seq_len"]).state_dict(), wan.state_dict())
    # Without `wan_precision` the same weights, all in bf16 and normalized in float32, compute something else.
    plain = VideoDiT.from_config({**ours.config, "wan_precision": False})
    plain.load_state_dict(ours.state_dict())
    assert max_diff_to_wan(wan, plain.to(torch.bfloat16), bf16_inputs(config)) > 4 * BF16_TOLERANCE


def test_saved_wan_precision_model_loads_in_bf16_with_its_float32_modules(tmp_path):
    ours = transformer_from_wan(tiny_wan(TINY_WAN["1.3b_like"]))
    ours.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and fp32_names(loaded) == fp32_names(ours.to(torch.bfloat16)) != set()
    assert_same_state(loaded.state_dict(), ours.state_dict())
    # Models without it are cast whole, as before.
    plain = VideoDiT.from_config({**ours.config, "wan_precision": False})
    plain.save_pretrained(tmp_path / "plain")
    assert fp32_names(VideoDiT.from_pretrained(tmp_path / "plain", torch_dtype=torch.bfloat16)) == set()
    assert fp32_names(plain.to(torch.bfloat16)) == set()


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
    """Run scripts/convert_wan.py's main in this process, as `python scripts/convert_wan.py ARGV` would."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_wan.py"
    return runpy.run_path(str(script))["main"](list(argv))


def test_convert_script_round_trip(tmp_path):
    """Wan transformer folder (sharded weights) -> VideoDiT folder -> Wan transformer folder, bit for bit."""
    config = TINY_WAN["14b_like"]
    wan = tiny_wan(config)
    wan.save_pretrained(tmp_path / "wan", max_shard_size="20KB")
    assert (tmp_path / "wan" / "diffusion_pytorch_model.safetensors.index.json").exists()

    assert convert("--src", str(tmp_path / "wan"), "--out", str(tmp_path / "ours")) == 0
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


# ----------------------------------------------------------------------------------------------------
# Whole pipelines: WanPipeline folders through T2VPipeline
# ----------------------------------------------------------------------------------------------------

# Sizes of hf-internal-testing/tiny-random-t5, whose config diffusers' Wan pipeline tests build their text
# encoder from (d_model = the transformer's text_dim 32); the hub is out of reach, so the vocabulary is ours.
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_heads=4, num_layers=5, relative_attention_num_buckets=8)
WORDS = "a the red circle blue square dance monkey negative moving up".split()
WAN_CALL = dict(negative_prompt="negative", num_frames=9, height=16, width=16, num_inference_steps=3)  # diffusers'


def tiny_tokenizer():
    """A T5 tokenizer (Unigram, as umT5's) over a few words and single characters: no download, no sentencepiece."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", *("\u2581" + word for word in WORDS), "\u2581",
              *string.ascii_lowercase, *string.digits, *",.!?'-"]  # fmt: skip
    return T5Tokenizer(vocab=[(piece, 0.0 if i < 3 else -float(i)) for i, piece in enumerate(pieces)], extra_ids=0)


def tiny_wan_pipeline(encoder: str = "umt5", scheduler: str = "unipc") -> WanPipeline:
    """diffusers' WanPipeline test components (VAE, transformer, FlowMatchEuler scheduler, a T5 encoder) with
    every transformer weight random; umT5 as Wan 2.1 has it, and Wan 2.1's UniPC flow scheduler."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    config_cls, encoder_cls = {"umt5": (UMT5Config, UMT5EncoderModel), "t5": (T5Config, T5EncoderModel)}[encoder]
    torch.manual_seed(0)
    text_encoder = encoder_cls(config_cls(vocab_size=len(tokenizer), **TINY_T5)).eval()
    schedulers = {
        "flow_match_euler": FlowMatchEulerDiscreteScheduler(shift=7.0),
        "unipc": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    }
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=schedulers[scheduler],
                       transformer=tiny_wan(DIFFUSERS_PIPELINE))  # fmt: skip


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers"
    tiny_wan_pipeline().save_pretrained(path)
    return path


def latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 16, 3, 2, 2, generator=torch.Generator().manual_seed(seed))  # 9 x 16 x 16 frames


def wan_notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is a Wan 2.1 pipeline" in r.getMessage()]


@pytest.mark.parametrize("encoder,scheduler", [("umt5", "unipc"), ("umt5", "flow_match_euler"),
                                               ("t5", "flow_match_euler")])  # fmt: skip
def test_wan_folder_samples_the_frames_wan_pipeline_samples(tmp_path, caplog, encoder, scheduler):
    wan = tiny_wan_pipeline(encoder, scheduler)
    wan.save_pretrained(tmp_path / "wan")
    with caplog.at_level(logging.WARNING):
        ours = T2VPipeline.from_pretrained(tmp_path / "wan")
    assert len(wan_notices(caplog)) == 1 and "\n" not in wan_notices(caplog)[0]
    assert isinstance(ours.transformer, VideoDiT) and type(ours.scheduler) is type(wan.scheduler)
    assert ours.config.max_sequence_length == 512

    prompts = ["dance monkey", "a red circle moving up"]
    for guidance in (6.0, 1.0):
        call = dict(prompt=prompts, guidance_scale=guidance, **WAN_CALL)
        expected = wan(**call, latents=latents(2)).frames  # (2, 9, 16, 16, 3)
        actual = ours(**call, latents=latents(2)).frames
        assert actual.shape == expected.shape == (2, 9, 16, 16, 3)
        assert np.abs(actual - expected).max() <= 1e-4
        # The denoised latents too (values up to about 4), which the tiny VAE's near-grey frames would hide.
        expected = wan(**call, latents=latents(2), output_type="latent").frames
        actual = ours(**call, latents=latents(2), output_type="latent").frames
        assert (actual - expected).abs().max() <= 1e-4
    # The prompt reaches the frames: the same noise under another prompt gives another video.
    other = ours(prompt=prompts[::-1], guidance_scale=6.0, **WAN_CALL, latents=latents(2)).frames
    assert np.abs(other - ours(prompt=prompts, guidance_scale=6.0, **WAN_CALL, latents=latents(2)).frames).max() > 1e-3


def test_prompts_are_encoded_as_wan_encodes_them(wan_folder):
    """umT5 states zero past each prompt's end, padded to 512 tokens; Wan's own embeddings, given as the plain
    tensors diffusers pipelines take, sample the same frames as the prompts."""
    wan, ours = WanPipeline.from_pretrained(wan_folder), T2VPipeline.from_pretrained(wan_folder)
    prompts = ["dance monkey", "a blue square moving up"]
    with torch.no_grad():  # as WanPipeline.__call__ runs it, to the length it asks for: (2, 512, 32) each
        expected, negative = wan.encode_prompt(prompts, "negative", max_sequence_length=512, device="cpu")
    embeds = ours.encode_prompt(prompts, "cpu")
    assert embeds.states.shape == expected.shape == (2, 512, 32)
    assert torch.equal(embeds.states, expected)
    lengths = embeds.mask.sum(dim=1)  # real tokens, </s> included
    assert lengths.tolist() == [3, 6] and not embeds.states[0, 3:].any() and embeds.states[1, :6].abs().min() > 0

    call = dict(guidance_scale=6.0, **{k: v for k, v in WAN_CALL.items() if k != "negative_prompt"})
    from_prompts = ours(prompt=prompts, negative_prompt="negative", latents=latents(2), **call).frames
    from_tensors = ours(prompt_embeds=expected, negative_prompt_embeds=negative, latents=latents(2), **call).frames
    np.testing.assert_array_equal(from_tensors, from_prompts)


def test_convert_script_writes_whole_pipelines_both_ways(wan_folder, tmp_path, caplog):
    assert convert("--src", str(wan_folder), "--out", str(tmp_path / "ours")) == 0
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "T2VPipeline" and index["transformer"] == ["t2v.models.dit", "VideoDiT"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["scheduler"][1] == "UniPCMultistepScheduler"
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"] and (tmp_path / "ours" / "tokenizer").is_dir()
    # Wan's call defaults and frame rate, stated in the folder.
    assert index["max_sequence_length"] == 512 and index["generation_defaults"] == {
        "num_frames": 81, "height": 480, "width": 832, "num_inference_steps": 50, "guidance_scale": 5.0, "fps": 16}

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        saved = T2VPipeline.from_pretrained(tmp_path / "ours")
    assert not wan_notices(caplog)
    on_load = T2VPipeline.from_pretrained(wan_folder)
    call = dict(prompt="dance monkey", guidance_scale=6.0, **WAN_CALL)
    np.testing.assert_array_equal(saved(**call, latents=latents(1)).frames, on_load(**call, latents=latents(1)).frames)

    assert convert("--src", str(tmp_path / "ours"), "--out", str(tmp_path / "back"), "--to", "wan",
                   "--rope-max-seq-len", "32") == 0  # fmt: skip
    back, original = WanPipeline.from_pretrained(tmp_path / "back"), WanPipeline.from_pretrained(wan_folder)
    for name in ("transformer", "vae", "text_encoder"):
        assert_same_state(getattr(back, name).state_dict(), getattr(original, name).state_dict())
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.transformer.config) == public(original.transformer.config)
    assert public(back.scheduler.config) == public(original.scheduler.config)


def test_generate_runs_on_a_wan_folder(wan_folder, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "generate.py", "dance monkey", "--model", str(wan_folder), "--out-dir",
                        str(out), "--num-frames", "9", "--height", "16", "--width", "16", "--steps", "2"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("is a Wan 2.1 pipeline") == 1
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert row["fps"] == 16 and row["num_inference_steps"] == 2
    assert iio.imread(out / row["path"], plugin="pyav").shape == (9, 16, 16, 3)


def test_evaluation_generates_on_a_wan_folder(wan_folder, tmp_path):
    """The evaluation's generate stage (scripts/evaluate.py) samples a Wan folder through the same loader."""
    from t2v.eval.evaluate import generate_stage
    from t2v.generation import GenerationSettings

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("dance monkey\na cat surfing\n")
    settings = GenerationSettings(num_frames=9, height=16, width=16, num_inference_steps=2, batch_size=2)
    videos = generate_stage(str(wan_folder), str(prompts), str(tmp_path / "eval"), settings, seed=3, device="cpu")
    rows = [json.loads(line) for line in open(os.path.join(videos, "manifest.jsonl"))]
    assert [row["prompt"] for row in rows] == ["dance monkey", "a cat surfing"] and [r["seed"] for r in rows] == [3, 4]


def test_wan_folder_loads_in_the_dtype_asked(wan_folder):
    """The transformer is cast as its files are read, keeping in float32 what diffusers keeps so when it loads
    Wan; the other components as diffusers casts them."""
    pipe = T2VPipeline.from_pretrained(wan_folder, dtype=torch.bfloat16)
    assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.bfloat16}
    wan = WanTransformer3DModel.from_pretrained(wan_folder, subfolder="transformer", torch_dtype=torch.bfloat16)
    assert_same_state(pipe.transformer.state_dict(), state_dict_from_wan(wan.state_dict()))
    assert fp32_names(pipe.transformer) == {
        name for name, _ in pipe.transformer.named_parameters() if in_fp32_modules(name, FP32_MODULES)
    } != set()
    assert_same_state(pipe.transformer.state_dict(), transformer_from_wan(wan_folder).to(torch.bfloat16).state_dict())
    frames = pipe(prompt="dance monkey", guidance_scale=6.0, **WAN_CALL, latents=latents(1)).frames
    assert frames.shape == (1, 9, 16, 16, 3) and np.isfinite(frames).all()


def test_folders_and_models_that_do_not_convert(wan_folder, tmp_path):
    two_stage = tmp_path / "wan22"
    shutil.copytree(wan_folder, two_stage)
    index = json.loads((two_stage / "model_index.json").read_text())
    (two_stage / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    with pytest.raises(ValueError, match="two-stage Wan 2.2 pipeline"):
        T2VPipeline.from_pretrained(two_stage)
    wan = WanPipeline.from_pretrained(wan_folder)
    with pytest.raises(ValueError, match="diffusers WanTransformer3DModel: convert it"):
        T2VPipeline(vae=wan.vae, transformer=wan.transformer, scheduler=wan.scheduler)


# ----------------------------------------------------------------------------------------------------
# Text encoders from diffusers folders, in the dtype asked
# ----------------------------------------------------------------------------------------------------


def test_text_encoder_folders_as_diffusers_lays_them_out(wan_folder, tmp_path):
    from t2v.models.text_encoder import load_text_encoder

    ids = tiny_tokenizer()("dance monkey").input_ids
    for spec in (wan_folder / "text_encoder", wan_folder):  # text_encoder/ beside tokenizer/, a folder with both
        tokenizer, encoder = load_text_encoder(str(spec))
        assert type(encoder).__name__ == "UMT5EncoderModel" and encoder.dtype == torch.float32
        assert tokenizer("dance monkey").input_ids == ids and not encoder.training
    shutil.copytree(wan_folder / "text_encoder", tmp_path / "lone" / "text_encoder")
    with pytest.raises(ValueError, match="belongs in .*lone/tokenizer', which holds no tokenizer"):
        load_text_encoder(str(tmp_path / "lone" / "text_encoder"))
    shutil.copytree(wan_folder / "text_encoder", tmp_path / "umt5")
    with pytest.raises(ValueError, match="umt5' holds no tokenizer"):
        load_text_encoder(str(tmp_path / "umt5"))


def test_text_encoder_dtype(wan_folder):
    from t2v.config import ModelConfig
    from t2v.models.text_encoder import TextEmbedder, text_encoder_dtype

    embedder = TextEmbedder.from_pretrained(str(wan_folder / "text_encoder"), max_length=512, dtype=torch.bfloat16)
    assert embedder.encoder.dtype == torch.bfloat16 and embedder(["dance monkey"]).states.dtype == torch.bfloat16
    assert text_encoder_dtype("fp32", "cpu") is torch.float32 and text_encoder_dtype("bf16", "cpu") is torch.bfloat16
    assert text_encoder_dtype("fp16", "cuda") is torch.float16
    with pytest.raises(ValueError, match="a float16 text encoder cannot run on the CPU"):
        text_encoder_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="model.text_encoder_dtype='fp8' is not one of"):
        ModelConfig(text_encoder_dtype="fp8")

    # The pipeline: diffusers' per-component dtype; a float16 encoder on the CPU is refused when it would run.
    pipe = T2VPipeline.from_pretrained(wan_folder, dtype={"text_encoder": torch.bfloat16, "default": torch.float32})
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.transformer.dtype == torch.float32
    call = dict(prompt="dance monkey", guidance_scale=6.0, **WAN_CALL)
    full = T2VPipeline.from_pretrained(wan_folder)(**call, latents=latents(1)).frames
    assert np.abs(pipe(**call, latents=latents(1)).frames - full).max() < 0.1
    pipe.text_encoder.to(torch.float16)
    with pytest.raises(ValueError, match="a float16 text encoder cannot run on the CPU"):
        pipe(**call)


def test_training_task_takes_a_converted_wan_and_its_text_encoder(wan_folder, tmp_path):
    from t2v.config import load_config
    from t2v.train.dit_task import DiTTask

    assert convert("--src", str(wan_folder), "--out", str(tmp_path / "ours")) == 0
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.dit={tmp_path / 'ours' / 'transformer'}",
                 f"model.vae={wan_folder / 'vae'}", f"model.text_encoder={wan_folder / 'text_encoder'}",
                 "model.max_text_length=512", "data.source=shapes", "data.frames=17", "data.height=64",
                 "data.width=64", "data.batch_size=1"]  # fmt: skip
    task = DiTTask(load_config(None, [*overrides, "model.text_encoder_dtype=bf16"]))
    assert task.text.encoder.dtype == torch.bfloat16 and isinstance(task.model, VideoDiT)
    out = task.loss(task.model, task.next_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="a float16 text encoder cannot run on the CPU"):
        DiTTask(load_config(None, [*overrides, "model.text_encoder_dtype=fp16"]))


def test_a_fixed_shift_reaches_wans_unipc_scheduler(wan_folder):
    """generate.py --shift S on a Wan folder: UniPC's shift is `flow_shift`, and it must change."""
    from t2v.generation import set_sampler

    pipe = T2VPipeline.from_pretrained(wan_folder)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    set_sampler(pipe, shift=7.0)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.scheduler.config.flow_shift == 7.0

"""LoRA: default targets on VideoDiT and a converted Wan, the adapter file a training run exports, loading it into
the base pipeline (the merged pipeline's output), scales and unloading, bad files, generate.py --lora (CPU, tiny)."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from helpers import tiny_dit, tiny_pipeline, tiny_vae
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

from t2v.config import ModelConfig, load_config
from t2v.models.text_encoder import TINY_RANDOM, load_text_encoder
from t2v.models.wan import transformer_from_wan
from t2v.pipelines import T2VPipeline
from t2v.pipelines.loading import load_pipeline
from t2v.pipelines.lora import save_lora_file
from t2v.train.trainable import merge_lora, prepare_trainable

ROOT = Path(__file__).resolve().parents[1]
LORA_FILE = "pytorch_lora_weights.safetensors"
# diffusers' tiny Wan test transformer, with the tiny VAE's 4 latent channels and the tiny text encoder's width.
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)  # fmt: skip


def tiny_wan_dit():
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**TINY_WAN)
    with torch.no_grad():  # every tensor random: zero-initialised gates would hide the adapters
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return transformer_from_wan(wan).eval()


def pipeline_around(transformer) -> T2VPipeline:
    tokenizer, text_encoder = load_text_encoder(TINY_RANDOM)
    return T2VPipeline(vae=tiny_vae(), transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       text_encoder=text_encoder, tokenizer=tokenizer, max_sequence_length=16,
                       generation_defaults={"num_frames": 5, "height": 16, "width": 16, "num_inference_steps": 2,
                                            "guidance_scale": 3.0, "fps": 8})  # fmt: skip


def add_random_adapter(model, rank: int = 4, alpha: float = 8.0):
    """The default LoRA targets with non-zero B (a fresh adapter is the identity), as training leaves them."""
    prepare_trainable(model, ModelConfig(lora_rank=rank, lora_alpha=alpha))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def adapted(model) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))


def velocity(transformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    cfg = transformer.config
    inputs = dict(hidden_states=torch.randn(2, cfg.in_channels, 3, 8, 8, generator=gen), timestep=torch.tensor([900, 30]),
                  encoder_hidden_states=torch.randn(2, 5, cfg.text_dim, generator=gen))  # fmt: skip
    if cfg.pooled_dim:
        inputs["pooled_projections"] = torch.randn(2, cfg.pooled_dim, generator=gen)
    with torch.no_grad():
        return transformer(**inputs).sample


def frames(pipe) -> np.ndarray:
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").frames


def assert_close(actual, expected, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------
# Default targets
# ----------------------------------------------------------------------------------------------------

BLOCK_PROJECTIONS = ["cross_attn.to_kv", "cross_attn.to_out", "cross_attn.to_q", "mlp.0", "mlp.2"]


@pytest.mark.parametrize(
    "name, make, self_attns",
    [("video_dit", tiny_dit, 1), ("factorized", lambda: tiny_dit(attention_layout="factorized"), 2),
     ("wan", tiny_wan_dit, 1)],
)  # fmt: skip
def test_default_targets_are_every_block_projection(name, make, self_attns):
    model = make()
    prepare_trainable(model, ModelConfig(lora_rank=2))
    per_block = [f"self_attns.{i}.{p}" for i in range(self_attns) for p in ("to_qkv", "to_out")] + BLOCK_PROJECTIONS
    expected = sorted(f"blocks.{b}.{p}" for b in range(model.config.num_layers) for p in per_block)
    assert adapted(model) == expected  # 7 per block (9 factorized); no embedder, adaLN or final layer
    assert len(expected) == model.config.num_layers * (5 + 2 * self_attns)


# ----------------------------------------------------------------------------------------------------
# Adapter files: load, scale, fuse, unload
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_dit, tiny_wan_dit], ids=["video_dit", "wan"])
def test_loaded_adapter_equals_merged_model(make, tmp_path):
    base = make()
    trained = add_random_adapter(copy.deepcopy(base), rank=4, alpha=8.0)
    path = save_lora_file(trained, str(tmp_path / LORA_FILE))
    merged = merge_lora(copy.deepcopy(trained))
    expected, base_out = velocity(merged), velocity(base)
    halved = copy.deepcopy(trained)
    with torch.no_grad():
        for name, p in halved.named_parameters():
            p.mul_(0.5 if "lora_B" in name else 1.0)
    expected_half = velocity(merge_lora(halved))
    assert (expected - base_out).abs().max() > 1e-2  # the adapter changes the model: the test can fail

    with safe_open(path, "pt") as f:
        assert all(key.startswith("transformer.") and ".lora_" in key for key in f.keys())
        assert '"transformer.lora_alpha": 8' in f.metadata()["lora_adapter_metadata"]  # scale alpha / r = 2

    pipe = pipeline_around(base)
    pipe.load_lora_weights(tmp_path, adapter_name="style")  # the folder: its pytorch_lora_weights.safetensors
    assert_close(velocity(pipe.transformer), expected)
    pipe.set_adapters("style", 0.0)
    assert_close(velocity(pipe.transformer), base_out)
    pipe.set_adapters("style", 0.5)
    assert_close(velocity(pipe.transformer), expected_half)
    pipe.set_adapters("style", 1.0)
    pipe.fuse_lora()
    assert_close(velocity(pipe.transformer), expected)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert adapted(pipe.transformer) == []
    assert_close(velocity(pipe.transformer), base_out)


def test_bad_lora_inputs_name_the_problem(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="'no/such.safetensors' is not a file or a folder"):
        pipe.load_lora_weights("no/such.safetensors")
    with pytest.raises(ValueError, match=f"has no {LORA_FILE}"):
        pipe.load_lora_weights(tmp_path)
    lora = {"transformer.blocks.7.mlp.0.lora_A.weight": torch.zeros(2, 32),
            "transformer.blocks.7.mlp.0.lora_B.weight": torch.zeros(128, 2)}  # fmt: skip
    save_file(lora, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"'transformer.blocks.7.mlp.0.lora_A.weight'.* name no linear layer"):
        pipe.load_lora_weights(tmp_path / "other.safetensors")
    wan_norm = {"transformer.blocks.0.attn1.norm_q.lora_A.weight": torch.zeros(2, 32),
                "transformer.blocks.0.attn1.norm_q.lora_B.weight": torch.zeros(32, 2)}  # fmt: skip
    with pytest.raises(ValueError, match=r"\['blocks.0.attn1.norm_q'\] are not linear layers of a Wan"):
        pipe.load_lora_weights(wan_norm)
    unprefixed = {"blocks.0.mlp.0.lora_A.weight": torch.zeros(2, 32)}
    with pytest.raises(ValueError, match="'blocks.0.mlp.0.lora_A.weight'"):
        pipe.load_lora_weights(unprefixed)
    assert adapted(pipe.transformer) == []  # nothing half-loaded


# ----------------------------------------------------------------------------------------------------
# Training exports the merged pipeline and the adapter
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 3-step LoRA run of the debug config on rendered clips: (run folder, the transformer it started from)."""
    from t2v.data.shapes import write_dataset
    from t2v.train import trainer
    from t2v.train.dit_task import DiTTask

    clips = tmp_path_factory.mktemp("clips")
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(str(ROOT / "configs" / "train" / "debug.yaml"),
                      [f"data.manifest={write_dataset(clips, num=4, seed=0)}", f"output_dir={run}",
                       "train.max_steps=3", "train.lr=1e-2", "train.warmup_steps=0", "train.ema_decay=0",
                       "model.lora_rank=4", "model.lora_alpha=8", "train.validation_steps=2"])  # fmt: skip
    task = DiTTask(cfg)
    with torch.no_grad():  # stand in for pretrained weights: open the zero-initialised gates
        generator = torch.Generator().manual_seed(0)
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    base = copy.deepcopy(task.model)
    trainer.train(cfg, task)
    return run, base


def test_lora_run_exports_merged_pipeline_and_adapter(lora_run):
    run, base = lora_run
    assert (run / "pipeline" / "model_index.json").is_file() and (run / LORA_FILE).is_file()
    merged = T2VPipeline.from_pretrained(run / "pipeline")
    pipe = T2VPipeline.from_pretrained(run / "pipeline", transformer=base)
    base_frames = frames(pipe)
    pipe.load_lora_weights(run / LORA_FILE)
    assert len(adapted(pipe.transformer)) == 7 * base.config.num_layers
    assert_close(velocity(pipe.transformer), velocity(merged.transformer))
    assert_close(frames(pipe), frames(merged))
    assert np.abs(frames(pipe) - base_frames).max() > 1e-3  # training moved the adapter
    pipe.unload_lora_weights()
    assert_close(frames(pipe), base_frames)


def test_load_pipeline_fuses_a_lora(lora_run, tmp_path):
    run, base = lora_run
    base_dir = tmp_path / "base"
    T2VPipeline.from_pretrained(run / "pipeline", transformer=base).save_pretrained(base_dir)
    pipe = load_pipeline(base_dir, device="cpu", lora=run, lora_scale=1.0)
    assert adapted(pipe.transformer) == []  # folded into plain linears
    assert_close(frames(pipe), frames(load_pipeline(run / "pipeline", device="cpu")))
    with pytest.raises(ValueError, match="--lora-scale nan"):
        load_pipeline(base_dir, device="cpu", lora=run, lora_scale=float("nan"))


# ----------------------------------------------------------------------------------------------------
# generate.py --lora
# ----------------------------------------------------------------------------------------------------


def _generate(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_generate_with_a_lora(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    save_lora_file(add_random_adapter(copy.deepcopy(pipe.transformer)), str(tmp_path / LORA_FILE))
    r = _generate("a red circle", "--model", tmp_path / "model", "--out-dir", tmp_path / "out", "--steps", 1,
                  "--lora", tmp_path, "--lora-scale", 0.5)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "00000.mp4").is_file()


@pytest.mark.parametrize("args, message", [
    (["--lora", "no/such/lora"], "--lora 'no/such/lora' is not a file or a folder"),
    (["--lora-scale", "0.5"], "--lora-scale needs --lora"),
])  # fmt: skip
def test_generate_lora_errors_exit_2_with_one_line(tmp_path, args, message):
    r = _generate("a prompt", "--out-dir", tmp_path / "out", *args)
    assert r.returncode == 2
    assert r.stderr.strip() == f"generate.py: error: {message}"


# ----------------------------------------------------------------------------------------------------
# Wan LoRA files onto a converted Wan
# ----------------------------------------------------------------------------------------------------

WAN_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@pytest.mark.parametrize(
    "lora, with_metadata",
    [(dict(r=2, lora_alpha=4, rank_pattern={"to_k": 3}, alpha_pattern={"to_v": 1}, target_modules=WAN_PROJECTIONS),
      True),
     (dict(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]), False)],  # k without LoRA; scale 1, no metadata
    ids=["all_projections", "q_and_v"],
)  # fmt: skip
def test_wan_lora_file_loads_onto_fused_projections_exactly(lora, with_metadata, tmp_path):
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    wan = WanTransformer3DModel(**TINY_WAN)
    with torch.no_grad():
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    base = transformer_from_wan(wan).eval()
    wan.add_adapter(LoraConfig(**lora))
    with torch.no_grad():
        for name, p in wan.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    tensors = get_peft_model_state_dict(wan)
    if with_metadata:  # what diffusers' Wan LoRA trainers save
        WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=tensors,
                                      transformer_lora_adapter_metadata=wan.peft_config["default"].to_dict())
        source = tmp_path / LORA_FILE
    else:
        source = {f"transformer.{k}": v for k, v in tensors.items()}
    expected = velocity(transformer_from_wan(merge_lora(wan)).eval())
    base_out = velocity(base)
    assert (expected - base_out).abs().max() > 1e-2

    pipe = pipeline_around(base)
    pipe.load_lora_weights(source)
    assert_close(velocity(pipe.transformer), expected)
    pipe.unload_lora_weights()
    assert_close(velocity(pipe.transformer), base_out)

"""Training: config, checkpoints, the shared loop, the DiT and VAE tasks, exact resume, export (CPU, tiny)."""

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from t2v.config import load_config
from t2v.models.loading import resolve_model_spec
from t2v.runtime import autocast_dtype
from t2v.train import checkpoint as ckpt
from t2v.train import rng, trainer
from t2v.train.logger import read_metrics
from t2v.train.optim import lr_factor
from t2v.train.trainable import compile_model, prepare_trainable

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "train" / "debug.yaml")
DEBUG_VAE = str(ROOT / "configs" / "train" / "debug_vae.yaml")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Six Shapes World clips written as mp4 with a path,caption manifest."""
    from t2v.data.shapes import write_dataset

    return str(write_dataset(tmp_path_factory.mktemp("clips"), num=6, seed=0))


def debug_config(path, output_dir, manifest, *overrides):
    return load_config(path, [f"data.manifest={manifest}", f"output_dir={output_dir}", *overrides])


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


def test_config_yaml_and_overrides(tmp_path):
    cfg = load_config(DEBUG, ["train.max_steps=7", "train.lr=0.5", "data.manifest=x.csv", "model.trainable=[blocks]"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.5 and cfg.model.trainable == ["blocks"]
    assert cfg.model.dit == "tiny" and cfg.data.frames == 5  # from the YAML
    assert cfg.train.betas == [0.9, 0.999]  # a default neither file nor command line touched
    from t2v.config import save_config

    save_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "train.lrr"),
        ("modle.dit=tiny", "modle"),
        ("train.max_steps=many", "train.max_steps"),
        ("train.lr_schedule=step", "lr_schedule"),
        ("data.source=folder", "data.source"),
        ("data.shapes.wordings=narrow", "data.shapes.wordings"),
        ("data.shapes.wordings=wide", "needs data.source=shapes"),
        ("data.shapes.two_object_prob=0.9", "needs data.source=shapes"),
        ("data.shapes.canonical_prob=0.9", "needs data.source=shapes"),
        ("distributed.zero_stage=2", "needs distributed.backend=deepspeed"),
        ("distributed.offload_optimizer=true", "is a DeepSpeed setting"),
        ("data.shapes.two_object_prob=1.5", "data.shapes.two_object_prob"),
        ("distributed.backend=mpi", "distributed.backend"),
        ("train.max_steps", "key=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEBUG, [override])


@pytest.mark.parametrize("path", sorted([*(ROOT / "configs" / "train").glob("*.yaml"),
                                         *(ROOT / "examples" / "shapes_world" / "configs").glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_shipped_training_configs_load(path):
    """Every config in configs/train and the Shapes World recipe's stages pass the typed checks."""
    cfg = load_config(str(path))
    assert cfg.output_dir and cfg.train.max_steps > 0


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  max_step: 3\n")
    with pytest.raises(ValueError, match="train.max_step"):
        load_config(str(tmp_path / "bad.yaml"))


def test_fp16_refused_on_cpu():
    with pytest.raises(ValueError, match="fp16"):
        autocast_dtype("fp16", torch.device("cpu"))
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cpu")) is None


def test_lr_schedule_by_hand():
    factors = [lr_factor(s, 2, 6, "linear") for s in range(6)]
    # warm-up 1/2, 2/2; then linear from 1 over the remaining 4 updates
    assert factors == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert lr_factor(4, 0, 8, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 0, 8, "constant") == 1.0


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def test_latest_ignores_tmp_folders_and_keep_last(tmp_path):
    root = str(tmp_path / "checkpoints")
    for step in (10, 20, 30):
        ckpt.save_checkpoint(root, step, {"model": {"w": torch.full((2,), float(step))}}, {"step": step}, keep_last=2)
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [20, 30]
    # An interrupted write of a later step: complete contents, but never renamed into place.
    os.makedirs(os.path.join(root, "step-40.tmp-deadbeef"))
    (Path(root) / "step-40.tmp-deadbeef" / "state.json").write_text("{}")
    latest = ckpt.latest_checkpoint(root)
    assert latest.endswith("step-30")
    tensors, state = ckpt.load_checkpoint(latest)
    assert state == {"step": 30} and torch.equal(tensors["model"]["w"], torch.full((2,), 30.0))
    assert ckpt.resolve_resume("latest", str(tmp_path)) == latest
    assert ckpt.resolve_resume("", str(tmp_path)) is None
    with pytest.raises(ValueError, match="not a checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove", "state"])
def test_resume_latest_falls_back_past_a_damaged_checkpoint(tmp_path, damage):
    root = str(tmp_path / "checkpoints")
    for step in (10, 20):
        ckpt.save_checkpoint(root, step, {"model": {"w": torch.full((64,), float(step))}, "ema": {"w": torch.ones(4)}},
                             {"step": step})
    newest = Path(root) / "step-20"
    model = newest / "model.safetensors"
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "remove":
        (newest / "ema.safetensors").unlink()
    else:
        (newest / "state.json").write_text('{"step": 2')
    with pytest.warns(UserWarning, match="step-20' is damaged"):
        assert ckpt.resolve_resume("latest", str(tmp_path)) == str(Path(root) / "step-10")
    with pytest.raises(ValueError, match="step-20' is a damaged checkpoint"):
        ckpt.resolve_resume(str(newest), str(tmp_path))
    assert ckpt.checkpoint_damage(str(Path(root) / "step-10")) is None


def test_checkpoints_without_checksums_still_load_and_leftovers_are_removed(tmp_path):
    from safetensors.torch import save_file

    old = tmp_path / "checkpoints" / "step-5"  # as written before state.json listed its files
    old.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(old / "model.safetensors"))
    (old / "state.json").write_text('{"step": 5}')
    assert ckpt.resolve_resume("latest", str(tmp_path)) == str(old)
    tensors, state = ckpt.load_checkpoint(str(old))
    assert state == {"step": 5} and torch.equal(tensors["model"]["w"], torch.ones(3))
    (old / "model.safetensors").write_bytes(b"\x00\x01")
    assert "model.safetensors is unreadable" in ckpt.checkpoint_damage(str(old))
    leftover = tmp_path / "checkpoints" / "step-6.tmp-0badcafe"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    ckpt.save_checkpoint(str(tmp_path / "checkpoints"), 7, {"model": {"w": torch.ones(1)}}, {"step": 7})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-5", "step-7"]


def test_optimizer_and_rng_state_round_trip():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, meta = ckpt.flatten_optimizer_state(optimizer.state_dict())
    meta = json.loads(json.dumps(meta))  # what a checkpoint stores
    restored = ckpt.unflatten_optimizer_state(tensors, meta)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    fresh.load_state_dict(restored)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    assert fresh.param_groups[0]["lr"] == 0.1

    generator = torch.Generator().manual_seed(3)
    rng_tensors, rng_meta = rng.capture_process_rng({"train": generator})
    rng_meta = json.loads(json.dumps(rng_meta))
    expected = (np.random.rand(), torch.rand(2), torch.rand(2, generator=generator), random.random())
    rng.restore_process_rng(rng_tensors, rng_meta, {"train": generator})
    again = (np.random.rand(), torch.rand(2), torch.rand(2, generator=generator), random.random())
    assert expected[0] == again[0] and expected[3] == again[3]
    assert torch.equal(expected[1], again[1]) and torch.equal(expected[2], again[2])


# ----------------------------------------------------------------------------------------------------
# The shared loop on a toy task: non-finite losses
# ----------------------------------------------------------------------------------------------------


class ToyTask:
    """Regress a fixed linear map; `nan_calls` lists loss calls (0-based) that return NaN."""

    def __init__(self, nan_calls=()):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.device = torch.device("cpu")
        self.nan_calls, self.calls, self.exported = set(nan_calls), 0, False

    def next_batch(self):
        x = torch.randn(8, 4)
        return x, x.sum(dim=1, keepdim=True)

    def loss(self, model, batch, generator):
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        self.calls += 1
        return trainer.StepOutput(loss=loss, samples=8, tokens=8)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]

    def validate(self, model, step):
        return {}

    def export(self, model):
        self.exported = True


def toy_config(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path}", "train.mixed_precision=fp32", "train.log_every=1",
                              "train.lr=0.01", *overrides])


def test_nonfinite_loss_skips_the_update_and_is_logged(tmp_path):
    task = ToyTask(nan_calls={2, 3})
    state = trainer.train(toy_config(tmp_path, "train.max_steps=5", "train.max_nonfinite_steps=3"), task)
    assert state.step == 5 and task.calls == 7 and task.exported
    rows = read_metrics(str(tmp_path))
    skipped = [row for row in rows if row.get("skipped_nonfinite")]
    assert [row["step"] for row in skipped] == [2, 2] and skipped[0]["loss"] == "nan"
    assert [row["nonfinite_in_a_row"] for row in skipped] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in rows if not row.get("skipped_nonfinite"))
    weights = load_file(str(tmp_path / "checkpoints" / "step-5" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_nonfinite_losses_stop_with_the_checkpoint_intact(tmp_path):
    task = ToyTask(nan_calls=set(range(4, 100)))
    cfg = toy_config(tmp_path, "train.max_steps=50", "train.ckpt_every=2", "train.max_nonfinite_steps=3")
    with pytest.raises(trainer.NonFiniteLossError, match="3 non-finite losses in a row.*step-4"):
        trainer.train(cfg, task)
    assert [step for step, _ in ckpt.list_checkpoints(str(tmp_path / "checkpoints"))] == [2, 4]
    weights = load_file(str(tmp_path / "checkpoints" / "step-4" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not task.exported


def test_grad_accumulation_and_trainable_subset(tmp_path):
    task = ToyTask()
    bias_before = task.model.bias.detach().clone()
    trainer.train(toy_config(tmp_path, "train.max_steps=3", "train.grad_accum=2", "model.trainable=[weight]"), task)
    assert task.calls == 6  # 3 updates x 2 micro-batches
    assert torch.equal(task.model.bias, bias_before)  # frozen
    assert not task.model.bias.requires_grad and task.model.weight.requires_grad


# ----------------------------------------------------------------------------------------------------
# DiT task
# ----------------------------------------------------------------------------------------------------


def test_dit_loss_finite_and_falls_on_a_memorised_batch(tmp_path, manifest):
    from t2v.train.dit_task import DiTTask

    task = DiTTask(debug_config(DEBUG, tmp_path, manifest, "data.caption_dropout=0"))
    batch = task.next_batch()
    params = prepare_trainable(task.model, task.cfg.model)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=1e-2)
    losses = []
    for _ in range(20):
        out = task.loss(task.model, batch, torch.Generator().manual_seed(0))  # same noise and sigmas
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert out.samples == 2 and out.tokens == 2 * 3 * 8 * 8  # latents (4, 3, 16, 16), patch (1, 2, 2)
    assert losses[-1] < 0.75 * losses[0]


class Interrupted(Exception):
    pass


def conditioned_tiny_dit(folder) -> list[str]:
    """Overrides that train a frame-conditioned tiny DiT with given first frames (a YAML written into folder)."""
    from omegaconf import OmegaConf

    path = Path(folder) / "dit_tiny_conditioned.yaml"
    OmegaConf.save(OmegaConf.create({**OmegaConf.load(resolve_model_spec("tiny", "dit")), "frame_conditioning": True}),
                   path)
    return [f"model.dit={path}", "data.condition_frames.image_prob=0.4", "data.condition_frames.extend_prob=0.4",
            "data.condition_frames.extend_min=2", "data.condition_frames.extend_max=2"]


@pytest.mark.parametrize("conditioning", [False, True], ids=["plain", "conditioning"])
def test_dit_resume_is_exact(tmp_path, manifest, conditioning):
    """40 steps in one go == 20 steps, a crash, and a resume to 40: bitwise equal weights (also with given frames,
    whose sampling draws from the loop's generator)."""
    from t2v.train.dit_task import DiTTask, train_dit

    extra = conditioned_tiny_dit(tmp_path) if conditioning else []
    straight = tmp_path / "straight"
    train_dit(debug_config(DEBUG, straight, manifest, *extra))

    class CrashingTask(DiTTask):
        """Fails when asked for the 21st step's batch, after step-20 was saved."""

        def next_batch(self):
            self.batches = getattr(self, "batches", 0) + 1
            if self.batches > 20:
                raise Interrupted
            return super().next_batch()

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        cfg = debug_config(DEBUG, resumed, manifest, *extra)
        trainer.train(cfg, CrashingTask(cfg))
    assert [step for step, _ in ckpt.list_checkpoints(str(resumed / "checkpoints"))] == [20]
    train_dit(debug_config(DEBUG, resumed, manifest, *extra, "resume=latest"))

    for group in ("model", "ema", "optimizer"):
        a = load_file(str(straight / "checkpoints" / "step-40" / f"{group}.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "step-40" / f"{group}.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{group} {name} differs after resume"
    # The runs really trained: the weights moved from the initial ones.
    first = load_file(str(resumed / "checkpoints" / "step-40" / "model.safetensors"))
    initial = DiTTask(debug_config(DEBUG, tmp_path / "x", manifest, *extra)).model.state_dict()
    assert any(not torch.equal(first[n], v) for n, v in initial.items())
    assert not conditioning or first["frame_mask_embed.weight"].any()  # given frames were part of training

    # Run folder contents.
    rows = read_metrics(str(straight))
    logged = [row for row in rows if "loss" in row]
    assert [row["step"] for row in logged] == list(range(5, 41, 5))
    for row in logged:
        assert {"step", "loss", "lr", "samples_per_s", "tokens_per_s", "peak_mem_mb"} <= row.keys()
        assert math.isfinite(row["loss"]) and row["samples_per_s"] > 0
    assert (straight / "config.yaml").is_file() and (straight / "pipeline" / "model_index.json").is_file()
    assert any((straight / "tensorboard").iterdir())
    assert [step for step, _ in ckpt.list_checkpoints(str(straight / "checkpoints"))] == [20, 40]  # keep_last 2


def test_compiled_training_matches_eager(tmp_path, manifest):
    """train.compile=true compiles each DiT block in place and trains to the same weights as eager mode, with
    gradient checkpointing around the compiled blocks and a validation (no grad, guided batch) after them."""
    from torch._dynamo.utils import counters

    from t2v.train.dit_task import train_dit

    counters.clear()
    runs = {}
    for mode, extra in (("eager", []), ("compiled", ["train.compile=true", "model.gradient_checkpointing=true",
                                                     "train.validation_prompts=[a red circle]"])):
        cfg = debug_config(DEBUG, tmp_path / mode, manifest, "train.max_steps=3", "train.ckpt_every=0", *extra)
        train_dit(cfg)
        runs[mode] = load_file(str(tmp_path / mode / "checkpoints" / "step-3" / "model.safetensors"))
        assert (counters["stats"]["unique_graphs"] > 0) == (mode == "compiled")  # the blocks ran as graphs
    assert list((tmp_path / "compiled" / "samples" / "step-3").glob("*.mp4"))
    assert runs["eager"].keys() == runs["compiled"].keys()  # no "_orig_mod." prefixes
    for name, value in runs["eager"].items():
        torch.testing.assert_close(runs["compiled"][name], value, rtol=1e-3, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match="has no `blocks` list"):  # a VAE is called through encode/decode
        compile_model(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("override", ["distributed.backend=deepspeed", "distributed.sequence_parallel_size=2"])
def test_compile_refused_where_untested(tmp_path, manifest, override):
    with pytest.raises(ValueError, match="train.compile=true works with"):
        debug_config(DEBUG, tmp_path, manifest, "train.compile=true", override)


def test_export_loads_in_the_pipeline(tmp_path, manifest):
    from t2v.pipelines.pipeline_t2v import T2VPipeline
    from t2v.train.dit_task import train_dit

    prompts = ["a small red circle moving left on a black background"]
    cfg = debug_config(DEBUG, tmp_path, manifest, "train.max_steps=3", "train.validate_every=3",
                       f"train.validation_prompts={json.dumps(prompts)}")
    train_dit(cfg)
    assert (tmp_path / "samples" / "step-3" / "00000.mp4").is_file()
    pipe = T2VPipeline.from_pretrained(str(tmp_path / "pipeline"))
    ema = load_file(str(tmp_path / "checkpoints" / "step-3" / "ema.safetensors"))
    exported = pipe.transformer.state_dict()
    assert all(torch.equal(exported[name], value) for name, value in ema.items())  # EMA weights were exported
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.base_shift == cfg.flow.base_shift
    video = pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()


class _Saved:
    """A stand-in model whose save_pretrained writes config.json, or fails halfway."""

    def __init__(self, tag: str, fail: bool = False):
        self.tag, self.fail = tag, fail

    def save_pretrained(self, folder: str, safe_serialization: bool = True):
        os.makedirs(folder, exist_ok=True)
        Path(folder, "config.json").write_text(json.dumps({"tag": self.tag}))
        if self.fail:
            raise OSError("disk full")


def test_save_atomically_replaces_refuses_and_cleans_up(tmp_path):
    from t2v.train.export import save_atomically

    out = tmp_path / "model"
    assert save_atomically(_Saved("a"), str(out)) == str(out)
    save_atomically(_Saved("b"), str(out), finish=lambda d: Path(d, "extra.txt").write_text("x"))
    assert json.loads((out / "config.json").read_text()) == {"tag": "b"} and (out / "extra.txt").is_file()
    with pytest.raises(OSError, match="disk full"):
        save_atomically(_Saved("c", fail=True), str(out))
    assert json.loads((out / "config.json").read_text()) == {"tag": "b"}  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folders left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved model"):
        save_atomically(_Saved("d"), str(other))
    assert (other / "todo.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError, match="not a folder"):
        save_atomically(_Saved("e"), str(other / "todo.txt"))


def test_lora_trains_adapters_only_and_export_merges_them(tmp_path, manifest):
    from t2v.pipelines.pipeline_t2v import T2VPipeline
    from t2v.train.dit_task import DiTTask

    cfg = debug_config(DEBUG, tmp_path, manifest, "train.max_steps=3", "model.lora_rank=4", "train.ema_decay=0",
                       "model.lora_target_modules=[to_qkv,to_out]")
    task = DiTTask(cfg)
    with torch.no_grad():  # stand in for pretrained weights: open the zero-initialised gates
        generator = torch.Generator().manual_seed(0)
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    base = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    trainer.train(cfg, task)
    trained = dict(task.model.named_parameters())
    assert all("lora_" in name for name, p in trained.items() if p.requires_grad)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in trained.items())  # adapters moved
    for name, value in base.items():  # base weights kept (wrapped layers hold them under .base_layer)
        module, _, leaf = name.rpartition(".")
        assert torch.equal(trained.get(name, trained.get(f"{module}.base_layer.{leaf}")), value), name
    pipe = T2VPipeline.from_pretrained(str(tmp_path / "pipeline"))
    exported = pipe.transformer.state_dict()
    assert not any("lora" in name for name in exported)
    qkv = "blocks.0.self_attns.0.to_qkv.weight"
    assert not torch.equal(exported[qkv], base[qkv])  # the adapter was folded in


def test_wan_vae_folder_as_the_vae(tmp_path, manifest):
    from diffusers import AutoencoderKLWan

    from t2v.train.dit_task import DiTTask

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                     attn_scales=[], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(tmp_path / "wan")
    cfg = debug_config(DEBUG, tmp_path / "run", manifest, f"model.vae={tmp_path / 'wan'}", "train.max_steps=2")
    task = DiTTask(cfg)
    assert type(task.vae).__name__ == "AutoencoderKLWan"
    trainer.train(cfg, task)
    rows = [row for row in read_metrics(str(tmp_path / "run")) if "loss" in row]
    assert rows and all(math.isfinite(row["loss"]) for row in rows)
    model_index = json.loads((tmp_path / "run" / "pipeline" / "model_index.json").read_text())
    assert model_index["vae"] == ["diffusers", "AutoencoderKLWan"]


def test_dit_trains_from_a_latent_cache_and_refuses_a_stale_one(tmp_path, manifest):
    from t2v.data.cache import finalize_cache, write_cache
    from t2v.train.dit_task import DiTTask

    on_the_fly = DiTTask(debug_config(DEBUG, tmp_path / "a", manifest))
    write_cache(str(tmp_path / "cache"), manifest, on_the_fly.vae, on_the_fly.text, frames=5, height=32, width=32,
                fps=8.0, batch_size=3, dtype=torch.float32)
    finalize_cache(str(tmp_path / "cache"), num_rows=6)

    cfg = debug_config(DEBUG, tmp_path / "run", manifest, "data.source=cache", f"data.cache={tmp_path / 'cache'}",
                       "train.max_steps=4", "data.caption_dropout=0.5", "train.ckpt_every=2")
    task = DiTTask(cfg)
    batch = task.next_batch()
    x0, text = task.encode(batch, torch.Generator().manual_seed(0))
    assert x0.shape == (2, 4, 3, 16, 16) and text.states.shape == (2, 16, 16)
    trainer.train(cfg, task)
    losses = [row["loss"] for row in read_metrics(str(tmp_path / "run")) if "loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)
    # Caption dropout swaps in the cached embedding of "".
    task.cfg.data.caption_dropout = 1.0
    _, dropped = task.encode(batch, torch.Generator().manual_seed(0))
    empty = task.dataset.cache.empty_caption()
    assert torch.equal(dropped.states[0], empty["text_states"]) and torch.equal(dropped.mask[1], empty["text_mask"])

    with pytest.raises(ValueError, match="stale"):  # another VAE (other seed) than the cache was made with
        DiTTask(debug_config(DEBUG, tmp_path / "b", manifest, "data.source=cache", f"data.cache={tmp_path / 'cache'}",
                             "train.seed=1"))
    # Without data.manifest, a cache of another clip shape than data.frames/height/width is refused too.
    with pytest.raises(ValueError, match="stale"):
        DiTTask(load_config(DEBUG, [f"output_dir={tmp_path / 'c'}", "data.source=cache", f"data.cache={tmp_path / 'cache'}",
                                    "data.frames=9"]))


def test_synthetic_cache_trains_with_its_vae_and_text_encoder(tmp_path):
    """scripts/make_synthetic_cache.py: a T5-shaped random text encoder, a cache the trainer accepts, a few steps."""
    import subprocess
    import sys

    from t2v.data.cache import LatentCache
    from t2v.models.text_encoder import TextEmbedder

    out = tmp_path / "synthetic"
    cmd = [sys.executable, str(ROOT / "scripts" / "make_synthetic_cache.py"), "--out", str(out), "--vae", "tiny",
           "--text-dim", "16", "--max-length", "48", "--caption-chars", "30", "--num", "5", "--shard-size", "3",
           "--frames", "5", "--height", "32", "--width", "32"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    text = TextEmbedder.from_pretrained(str(out / "text_encoder"), max_length=48)
    assert text.encoder.config.model_type == "t5" and text.dim == 16
    emb = text(["clip 1: a camera"])
    assert emb.mask.sum().item() == len("clip1:acamera")  # one token per character, spaces dropped
    cache = LatentCache(str(out / "cache"))
    assert len(cache) == 5 and cache.row(4)["latent_mean"].shape == (4, 3, 16, 16)
    assert cache.row(4)["text_states"].shape == (48, 16)

    run = tmp_path / "run"
    cfg = load_config(DEBUG, [f"output_dir={run}", "data.source=cache", f"data.cache={out / 'cache'}",
                              f"model.vae={out / 'vae'}", f"model.text_encoder={out / 'text_encoder'}",
                              "model.max_text_length=48", "train.max_steps=2", "train.log_every=1",
                              "train.validate_every=0", "train.ckpt_every=0"])
    from t2v.train.dit_task import DiTTask

    trainer.train(cfg, DiTTask(cfg))
    losses = [row["loss"] for row in read_metrics(str(run)) if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # never over an existing cache
    assert again.returncode != 0 and "exists; give an empty --out" in again.stderr


# ----------------------------------------------------------------------------------------------------
# VAE task
# ----------------------------------------------------------------------------------------------------


def test_ssim_and_psnr_by_hand():
    from t2v.eval.pixel_metrics import psnr, ssim, video_ssim

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert (ssim(x, torch.rand(2, 3, 16, 16)) < 0.2).all()
    assert (ssim(x, (x + 0.05).clamp(0, 1)) > 0.9).all()
    assert psnr(torch.zeros(1, 4), torch.full((1, 4), 0.1)).item() == pytest.approx(20.0)  # mse 0.01
    video = torch.rand(1, 3, 4, 8, 8)
    assert video_ssim(video, video).item() == pytest.approx(1.0)


def test_vae_trains_resumes_and_sets_the_latent_scale(tmp_path, manifest):
    from t2v.models.vae import CausalVideoVAE
    from t2v.train.vae_task import VAETask, train_vae

    straight = tmp_path / "straight"
    train_vae(debug_config(DEBUG_VAE, straight, manifest, "train.max_steps=6", "train.ckpt_every=3"))

    class CrashingTask(VAETask):
        def next_batch(self):
            self.batches = getattr(self, "batches", 0) + 1
            if self.batches > 3:
                raise Interrupted
            return super().next_batch()

    resumed = tmp_path / "resumed"
    cfg = debug_config(DEBUG_VAE, resumed, manifest, "train.max_steps=6", "train.ckpt_every=3")
    with pytest.raises(Interrupted):
        trainer.train(cfg, CrashingTask(cfg))
    train_vae(debug_config(DEBUG_VAE, resumed, manifest, "train.max_steps=6", "train.ckpt_every=3", "resume=latest"))
    a = load_file(str(straight / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-6" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)

    rows = read_metrics(str(straight))
    losses = [row["loss"] for row in rows if "loss" in row]
    assert all(math.isfinite(loss) for loss in losses)
    evals = [row for row in rows if "val_psnr" in row]
    assert evals and evals[-1]["val_psnr"] > 0 and 0 < evals[-1]["val_ssim"] <= 1

    vae = CausalVideoVAE.from_pretrained(str(straight / "vae"))
    assert vae.config.scaling_factor != 1.0 and vae.config.shift_factor != 0.0
    # The stored factors normalise this VAE's latents to roughly zero mean, unit std.
    task = VAETask(debug_config(DEBUG_VAE, tmp_path / "probe", manifest))
    with torch.no_grad():
        z = vae.encode(task.next_batch()["video"]).latent_dist.sample(torch.Generator().manual_seed(1))
    normalised = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(normalised.mean().item()) < 0.5 and 0.5 < normalised.std().item() < 2.0


def test_vae_shapes_stream_with_image_batches(tmp_path):
    from t2v.train.vae_task import VAETask

    cfg = load_config(DEBUG_VAE, [f"output_dir={tmp_path}", "data.source=shapes", "data.frames=17", "data.height=64",
                                  "data.width=64", "data.image_batch_prob=0.5"])
    task = VAETask(cfg)
    shapes = {tuple(task.next_batch()["video"].shape) for _ in range(8)}
    assert shapes == {(2, 3, 1, 64, 64), (2, 3, 17, 64, 64)}


@pytest.mark.parametrize("config", [DEBUG, DEBUG_VAE], ids=["dit", "vae"])
def test_shapes_source_refuses_other_clip_sizes_before_training(tmp_path, config):
    """Shapes World renders 17x64x64 clips: a task asking it for 5x32x32 stops as it builds its stream."""
    from t2v.train.dit_task import train_dit
    from t2v.train.vae_task import train_vae

    cfg = load_config(config, [f"output_dir={tmp_path}", "data.source=shapes"])  # the config alone accepts it
    with pytest.raises(ValueError, match=r"renders 17x64x64 clips, but data.frames/height/width = 5/32/32"):
        (train_dit if config == DEBUG else train_vae)(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_vae_spatial_gradient_term(tmp_path):
    from t2v.train.vae_task import VAETask

    cfg = load_config(DEBUG_VAE, [f"output_dir={tmp_path}", "data.source=shapes", "data.frames=17", "data.height=64",
                                  "data.width=64", "vae_loss.spatial_weight=2.0"])
    task = VAETask(cfg)
    batch = task.next_batch()
    generator = torch.Generator().manual_seed(0)
    out = task.loss(task.model, batch, generator)
    m = out.metrics
    assert m["spatial"] > 0
    expected = (m["reconstruction"] + cfg.vae_loss.temporal_weight * m["temporal"] + 2.0 * m["spatial"]
                + cfg.vae_loss.kl_weight * m["kl"] + cfg.vae_loss.hard_pixel_weight * m["hard_pixel"])
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="spatial_weight=-1.0"):
        load_config(DEBUG_VAE, ["vae_loss.spatial_weight=-1.0"])


def test_vae_detail_term_weights_isolated_pixels_over_edges(tmp_path):
    """An isolated pixel weighs 16x a straight-edge pixel; flat areas weigh nothing; the loss adds the term."""
    from t2v.train.vae_task import VAETask, detail_error

    x = -torch.ones(1, 3, 1, 16, 16)
    x[..., 2, 3] = 1.0  # isolated pixel
    x[..., 8:, 8:] = 1.0  # a block with straight edges (away from the isolated pixel)
    edge_only, nub_only = x.clone(), x.clone()
    edge_only[..., 12, 8] = -1.0  # the block loses one pixel of its left edge
    nub_only[..., 2, 3] = -1.0  # the isolated pixel is lost
    assert detail_error(x, x).item() == 0.0
    assert detail_error(nub_only, x).item() == pytest.approx(16 * detail_error(edge_only, x).item(), rel=1e-5)
    flat = x.clone()
    flat[..., 0, 15] = 0.0  # an error in a flat area costs nothing
    assert detail_error(flat, x).item() == 0.0
    # weights average 1 over the batch: a uniform error of 0.1 per channel costs 3 x 0.1
    assert detail_error(x + 0.1, x).item() == pytest.approx(0.3, rel=1e-5)
    assert detail_error(x + 0.1, torch.zeros_like(x)).item() == 0.0  # a flat target weighs nothing, without NaN

    cfg = load_config(DEBUG_VAE, [f"output_dir={tmp_path}", "data.source=shapes", "data.frames=17", "data.height=64",
                                  "data.width=64", "vae_loss.detail_weight=3.0"])
    task = VAETask(cfg)
    out = task.loss(task.model, task.next_batch(), torch.Generator().manual_seed(0))
    m = out.metrics
    assert m["detail"] > 0
    expected = (m["reconstruction"] + cfg.vae_loss.temporal_weight * m["temporal"] + cfg.vae_loss.kl_weight * m["kl"]
                + cfg.vae_loss.spatial_weight * m["spatial"] + cfg.vae_loss.hard_pixel_weight * m["hard_pixel"]
                + 3.0 * m["detail"])
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="detail_weight=-1.0"):
        load_config(DEBUG_VAE, ["vae_loss.detail_weight=-1.0"])


def test_validation_logs_retrieval_metrics_with_a_scorer(tmp_path, manifest):
    from t2v.eval.retriever import VideoEncoder, VideoTextRetriever
    from t2v.train.dit_task import train_dit

    torch.manual_seed(0)
    scorer_dir = tmp_path / "scorer"
    VideoTextRetriever(VideoEncoder(sample_size=32, patch_size=8, max_frames=5, hidden_size=32, num_layers=1,
                                    num_heads=2, embed_dim=16), text_head_hidden=32).save_pretrained(str(scorer_dir))
    prompts = ["a small red circle moving left on a black background", "a large blue square moving up on a white background"]
    cfg = debug_config(DEBUG, tmp_path / "run", manifest, "train.max_steps=2", "train.validate_every=2",
                       f"train.validation_prompts={json.dumps(prompts)}",
                       f"train.validation_scorer=retriever:{scorer_dir}")
    train_dit(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [row for row in rows if "val/t2v/R1" in row]
    assert validation and validation[0]["step"] == 2
    # Two prompts: R@1 is 0, 50 or 100 percent and the median rank 1 or 2.
    assert validation[0]["val/t2v/R1"] in (0.0, 50.0, 100.0) and 1 <= validation[0]["val/t2v/MedR"] <= 2


def test_validation_logs_shapes_readback(tmp_path, manifest):
    from t2v.train.dit_task import train_dit

    cfg = debug_config(DEBUG, tmp_path / "run", manifest, "train.max_steps=2", "train.validate_every=2",
                       "train.validation_shapes=1")
    train_dit(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [row for row in rows if "val/shapes/seen/all" in row]
    assert validation and validation[0]["step"] == 2
    keys = {k for k in validation[0] if k.startswith("val/shapes/")}
    assert keys == {f"val/shapes/{c}/{a}" for c in ("seen", "heldout", "paraphrase", "two_object")
                    for a in ("background", "colour", "shape", "size", "motion", "all")}
    assert all(validation[0][k] in (0.0, 1.0) for k in keys)  # one prompt per category
    assert not (tmp_path / "run" / "samples").exists()  # read back in memory, no video files
    with pytest.raises(ValueError, match="train.validation_shapes=-1"):
        debug_config(DEBUG, tmp_path / "bad", manifest, "train.validation_shapes=-1")


def test_vae_decoder_fine_tune_keeps_encoder_and_latent_scale(tmp_path, manifest):
    from t2v.models.vae import CausalVideoVAE
    from t2v.train.vae_task import train_vae

    base = tmp_path / "base"
    train_vae(debug_config(DEBUG_VAE, base, manifest, "train.max_steps=2", "train.ckpt_every=0"))
    tuned = tmp_path / "tuned"
    train_vae(debug_config(DEBUG_VAE, tuned, manifest, "train.max_steps=3", "train.ckpt_every=0",
                           f"model.vae={base / 'vae'}", "model.trainable=[decoder]"))
    a, b = CausalVideoVAE.from_pretrained(str(base / "vae")), CausalVideoVAE.from_pretrained(str(tuned / "vae"))
    assert a.config.scaling_factor == b.config.scaling_factor and a.config.shift_factor == b.config.shift_factor
    assert all(torch.equal(x, y) for x, y in zip(a.encoder.state_dict().values(), b.encoder.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(a.decoder.state_dict().values(), b.decoder.state_dict().values()))


def test_a_fresh_run_into_a_run_folder_is_refused(tmp_path, manifest):
    from t2v.train.dit_task import train_dit

    run = tmp_path / "run"
    train_dit(debug_config(DEBUG, run, manifest, "train.max_steps=2", "train.ckpt_every=0", "train.log_every=1"))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"holds another run \(checkpoints/step-2, metrics.jsonl, pipeline\)"):
        train_dit(debug_config(DEBUG, run, manifest, "train.max_steps=3", "train.ckpt_every=0"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # resume=latest continues it, and each step is logged once.
    train_dit(debug_config(DEBUG, run, manifest, "train.max_steps=3", "train.ckpt_every=0", "train.log_every=1",
                           "resume=latest"))
    steps = [row["step"] for row in read_metrics(str(run)) if "loss" in row]
    assert steps == [1, 2, 3]


def test_metrics_after_a_resume_drop_the_rows_past_the_checkpoint(tmp_path):
    from t2v.train.logger import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 31)) + "{bad\n")
    logger = MetricsLogger(str(tmp_path), tensorboard=False, start_step=20)
    logger.log(21, {"loss": 0.5})
    assert [row["step"] for row in read_metrics(str(tmp_path))] == [*range(1, 21), 21]


def test_an_all_unreadable_manifest_fails_fast(tmp_path):
    import subprocess
    import sys
    import time

    from t2v.train.dit_task import train_dit

    rows = []
    for i in range(6):
        path = tmp_path / f"clip{i}.mp4"
        path.write_bytes(os.urandom(64) if i % 2 else b"")  # random bytes and empty files
        rows.append(f"{path},a red circle")
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,caption\n" + "\n".join(rows) + "\n")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"bad.csv'.*6 samples in a row were unreadable"):
        train_dit(debug_config(DEBUG, tmp_path / "run", str(manifest), "train.max_steps=2"))
    assert time.monotonic() - start < 60
    from t2v.models.loading import load_vae

    vae = tmp_path / "vae"
    load_vae("tiny", seed=0).save_pretrained(str(vae))
    r = subprocess.run([sys.executable, "scripts/precompute.py", "--manifest", str(manifest), "--vae", str(vae),
                        "--text-encoder", "tiny-random", "--out", str(tmp_path / "cache"), "--frames", "5",
                        "--height", "32", "--width", "32", "--num-workers", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "no readable sample among the 6 manifest rows" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train.py", ["--config", DEBUG, "flow.logit_std=nan"], "flow.logit_std=nan must be a finite number"),
        ("train.py", ["--config", DEBUG, "train.lrr=1"], "unknown config key 'train.lrr'"),
        ("train.py", ["--config", "no-such.yaml"], "config file 'no-such.yaml' does not exist"),
        ("train.py", ["--config", DEBUG, "data.manifest=no-such.csv"], "no-such.csv"),
        ("train_vae.py", ["--config", DEBUG_VAE, "train.lr=inf"], "train.lr=inf must be a finite number"),
        ("train_retriever.py", ["--config", "configs/retriever/tiny.yaml", "retriever.eval_size=0"],
         "retriever.eval_size=0 must be >= 1"),
        ("train_retriever.py", ["--config", "configs/retriever/tiny.yaml", "data.frames=9"],
         "renders 17x64x64 clips, but data.frames/height/width = 9/64/64"),
        ("check_cluster.py", ["--config", DEBUG, "train.lrr=1"], "unknown config key 'train.lrr'"),
        ("check_cluster.py", ["--config", DEBUG, "--timeout-s", "nan"], "must be positive and finite"),
        ("precompute.py", ["--vae", "no-such-vae", "--text-encoder", "tiny-random", "--frames", "5"],
         "--vae 'no-such-vae' is not a VAE folder"),
        ("precompute.py", ["--vae", "VAE", "--text-encoder", "no/such-encoder", "--frames", "5"],
         "text encoder 'no/such-encoder' cannot be loaded"),
        ("precompute.py", ["--vae", "VAE", "--text-encoder", "tiny-random", "--frames", "6"], "frames 6 must be"),
    ],
)
def test_training_entry_points_answer_bad_input_in_one_line(tmp_path, manifest, script, args, message):
    import subprocess
    import sys

    from t2v.models.loading import load_vae

    out = tmp_path / "out"
    if script == "precompute.py":
        load_vae("tiny", seed=0).save_pretrained(str(tmp_path / "vae"))
        args = ["--manifest", manifest, "--out", str(out), "--height", "32", "--width", "32",
                *[str(tmp_path / "vae") if a == "VAE" else a for a in args]]
    else:
        args = [*args, f"output_dir={out}"]
        if not any(a.startswith("data.manifest=") for a in args):
            args.append(f"data.manifest={manifest}")
    r = subprocess.run([sys.executable, f"scripts/{script}", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1]
    assert r.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ")
    assert not out.exists()


def test_model_presets_are_package_data():
    """Presets live inside the package (shipped by a non-editable install), and a bad name lists them."""
    import tomllib

    import t2v
    from t2v.models.presets import PRESET_DIR, preset_names

    assert PRESET_DIR.is_relative_to(Path(t2v.__file__).parent)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["t2v"]
    assert "models/configs/*.yaml" in package_data
    assert {"tiny", "shapes", "1.3b"} <= set(preset_names("dit")) and "tiny" in preset_names("vae")
    with pytest.raises(ValueError, match=r"model.dit='huge' is not a folder, a YAML file or a preset; presets: \["):
        resolve_model_spec("huge", "dit")


def test_a_checkpoint_from_before_the_redesign_resumes_exactly(tmp_path):
    """A checkpoint written before the library was reorganised still loads: resuming its step 1 with today's
    code gives the old run's step-2 weights and EMA (tests/fixtures/checkpoint_before_redesign).

    Bit for bit on the CPU that wrote the fixture; another CPU's kernels round differently, by up to 3e-8 here.
    The tolerance, 1e-6, is far below what a wrong resume moves: one step changes weights by up to 4e-4
    (median 2.4e-4), so other noise, lost Adam moments or a lost schedule differ by ~1e-4."""
    import shutil

    from t2v.train.dit_task import train_dit

    fixture = ROOT / "tests" / "fixtures" / "checkpoint_before_redesign"
    shutil.copytree(fixture / "data", tmp_path / "data")
    shutil.copytree(fixture / "step-1", tmp_path / "run" / "checkpoints" / "step-1")
    train_dit(debug_config(DEBUG, tmp_path / "run", tmp_path / "data" / "manifest.csv", "resume=latest",
                           "train.max_steps=2", "train.ckpt_every=1", "train.log_every=1", "train.validate_every=0"))
    for group in ("model", "ema"):
        old = load_file(str(fixture / f"step-2-{group}.safetensors"))
        new = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / f"{group}.safetensors"))
        assert old.keys() == new.keys()
        for name in old:
            torch.testing.assert_close(new[name], old[name], rtol=0, atol=1e-6,
                                       msg=lambda m, g=group, n=name: f"{g} {n} differs from the old step 2: {m}")

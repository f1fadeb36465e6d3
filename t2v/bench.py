"""Side-by-side speed and memory benchmark of our models against diffusers' Wan reference models.

Pairs, each built from one configuration and fed the same inputs:
- `VideoDiT` (attention_layout="full", pooled_dim=0: Wan has no pooled text vector) against
  `WanTransformer3DModel` with the same width, depth, heads, MLP hidden size, patch size and text size:
  one denoising step ("dit_forward", no grad) and one training step ("dit_train_step", forward and
  backward of an MSE loss).
- `CausalVideoVAE` against `AutoencoderKLWan` at the same channel widths, res blocks per level, temporal
  downsampling and latent channels: "vae_encode" and "vae_decode" of one clip (both stream over time).

Both sides get the same random weights scheme (every matrix N(0, 0.02), so no zero-initialised gate
makes a branch trivially cheap), run under bf16 autocast with float32 weights, and are timed interleaved
in the same process after warm-up; the reported time is the median of the repeats. Peak memory is the
allocator peak above the state before the call: `torch.cuda.max_memory_allocated` on CUDA, the running sum
of the allocations recorded by `torch.profiler` (profile_memory) on CPU, measured in a separate call.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2v.models.presets import load_preset
from t2v.runtime import peak_memory_mb

PAIRS = ("dit_forward", "dit_train_step", "vae_encode", "vae_decode")
DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration: a DiT preset on latents (C, T, H, W) with `text_len` text tokens, and
    a VAE preset on a clip (T, H, W). Overrides change a preset (e.g. fewer layers in --quick mode)."""

    name: str
    dit_preset: str
    latent_shape: tuple[int, int, int, int]
    text_len: int
    vae_preset: str
    clip_shape: tuple[int, int, int]
    dit_overrides: dict = field(default_factory=dict)
    vae_overrides: dict = field(default_factory=dict)
    warmup: int = 2
    repeats: int = 5
    checkpointing: bool = False  # gradient checkpointing in the training step, on both sides
    note: str = ""


CONFIGS = {
    "tiny": BenchConfig("tiny", "dit_tiny", (4, 3, 8, 8), 8, "vae_tiny", (9, 16, 16), warmup=1, repeats=1,
                        note="test-sized models (smoke test)"),
    "shapes": BenchConfig("shapes", "dit_shapes", (16, 5, 8, 8), 32, "vae_shapes", (17, 64, 64)),
    "300m": BenchConfig("300m", "dit_300m", (16, 9, 32, 32), 512, "vae_base", (33, 256, 256), repeats=3),
    "1.3b": BenchConfig("1.3b", "dit_1.3b", (16, 21, 60, 104), 512, "vae_base", (81, 480, 832), warmup=1,
                        repeats=3, checkpointing=True,
                        note="training step with gradient checkpointing on both sides (activations of "
                             "32,760 tokens x 30 layers do not fit otherwise)"),
}
CUDA_ONLY = ("1.3b",)


def resolve_configs(names: list[str], device: torch.device, quick: bool) -> list[BenchConfig]:
    """The named configurations for `device`; --quick shrinks the repeats and, on CPU, the 300m sizes."""
    configs = []
    for name in names:
        if name not in CONFIGS:
            raise ValueError(f"configuration {name!r} is unknown; choose from {sorted(CONFIGS)}")
        if name in CUDA_ONLY and device.type != "cuda":
            raise ValueError(f"configuration {name!r} runs on cuda only (got device {device.type})")
        config = CONFIGS[name]
        if quick and name != "tiny":
            config = replace(config, warmup=1, repeats=3)
        if quick and name == "300m" and device.type == "cpu":
            config = replace(
                config, dit_overrides={"num_layers": 2}, latent_shape=(16, 5, 32, 32), text_len=128,
                clip_shape=(5, 64, 64),
                note="--quick on CPU: 2 of 18 DiT layers on latents 16x5x32x32 (1,280 tokens) with 128 text "
                     "tokens; VAE at base widths on a 5x64x64 clip",
            )
        configs.append(config)
    return configs


# ----------------------------------------------------------------------------------------------------
# Matched models
# ----------------------------------------------------------------------------------------------------


def dit_config(config: BenchConfig) -> dict:
    """Our VideoDiT config for a benchmark: the preset with overrides, full attention, no pooled vector."""
    return {**load_preset(config.dit_preset), **config.dit_overrides, "attention_layout": "full", "pooled_dim": 0}


def wan_transformer_config(ours: dict) -> dict:
    """WanTransformer3DModel arguments matching a VideoDiT config (width, depth, heads, MLP, patch, text)."""
    hidden, heads = ours["hidden_size"], ours["num_heads"]
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
    mlp_hidden = ours.get("mlp_hidden_size") or int(hidden * ours.get("mlp_ratio", 4.0))
    in_channels = ours["in_channels"]
    return dict(
        patch_size=tuple(ours["patch_size"]), num_attention_heads=heads, attention_head_dim=hidden // heads,
        in_channels=in_channels, out_channels=ours.get("out_channels") or in_channels,
        text_dim=ours["text_dim"], freq_dim=256, ffn_dim=mlp_hidden, num_layers=ours["num_layers"],
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=ours.get("eps", 1e-6), rope_max_seq_len=1024,
    )


def vae_config(config: BenchConfig) -> dict:
    return {**load_preset(config.vae_preset), **config.vae_overrides}


def wan_vae_config(ours: dict) -> dict:
    """AutoencoderKLWan arguments matching a CausalVideoVAE config (widths, res blocks, time steps, latents)."""
    widths = list(ours["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} must be multiples of the first width {base} for Wan's dim_mult")
    if not ours.get("mid_attention", True):
        raise ValueError("AutoencoderKLWan always has a mid attention block; set mid_attention=True to compare")
    temporal = [bool(t) for t in ours["temporal_downsample"]]
    z_dim = ours["latent_channels"]
    return dict(
        base_dim=base, z_dim=z_dim, dim_mult=[w // base for w in widths], num_res_blocks=ours["layers_per_block"],
        attn_scales=[], temperal_downsample=temporal, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
        in_channels=ours["in_channels"], out_channels=ours["out_channels"],
        scale_factor_temporal=2 ** sum(temporal), scale_factor_spatial=2 ** (len(widths) - 1),
    )


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Same weight scheme on both sides: every parameter of 2+ dims ~ N(0, 0.02); norms and biases kept."""
    with torch.no_grad():
        for param in model.parameters():
            generator = torch.Generator(param.device).manual_seed(seed)
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed interleaved after `warmup` rounds.

    Rounds alternate the order (A, B, then B, A, ...) so that drift in machine load falls on both sides.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Allocator peak (MiB) of one call of `fn` above what was allocated before it (the process-wide peak
    is `t2v.runtime.peak_memory_mb`)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return peak_memory_mb(device) - before / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


def matmul_tflops(device: torch.device, dtype: torch.dtype = DTYPE) -> float:
    """Measured dense matmul rate (TFLOP/s) of `dtype` on `device`: the yardstick for model FLOPs utilisation."""
    size, iters = (8192, 20) if device.type == "cuda" else (1536, 4)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def dit_train_flops(ours: dict, latent_shape: tuple[int, int, int, int], text_len: int) -> float:
    """Model FLOPs of one training step (forward + backward), the same for our DiT and its Wan match.

    6 * (P_video * N + P_text * L) + 12 * layers * (N^2 + N * L) * D, where N video tokens and L text tokens,
    P_video = weights of the matmuls applied to every video token (self-attention q, k, v, out; cross-attention
    q, out; MLP; patch embedding; output projection), P_text = those applied to every text token (text
    embedding, cross-attention k, v). Per-sample matmuls (timestep, adaLN) and recomputation are not counted.
    """
    channels, frames, height, width = latent_shape
    p_t, p_h, p_w = ours["patch_size"]
    hidden, layers = ours["hidden_size"], ours["num_layers"]
    mlp_hidden = ours.get("mlp_hidden_size") or int(hidden * ours.get("mlp_ratio", 4.0))
    tokens = (frames // p_t) * (height // p_h) * (width // p_w)
    patch_volume = p_t * p_h * p_w
    out_channels = ours.get("out_channels") or channels
    p_video = layers * (6 * hidden**2 + 2 * hidden * mlp_hidden) + patch_volume * (channels + out_channels) * hidden
    p_text = ours["text_dim"] * hidden + hidden**2 + layers * 2 * hidden**2
    return 6 * (p_video * tokens + p_text * text_len) + 12 * layers * (tokens**2 + tokens * text_len) * hidden


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=DTYPE)


def dit_steps(model: nn.Module, inputs: dict, device: torch.device) -> tuple[Callable, Callable]:
    """(denoising step, training step) closures for a transformer called as Wan is."""

    def forward():
        with torch.no_grad(), _autocast(device):
            return model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                         return_dict=False)[0]

    def train_step():
        with _autocast(device):
            out = model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                        return_dict=False)[0]
        loss = F.mse_loss(out.float(), inputs["target"])
        loss.backward()
        model.zero_grad(set_to_none=True)  # gradients count in the step's peak, then are released
        return loss.detach()

    return forward, train_step


def vae_steps(model: nn.Module, clip: torch.Tensor, latents: torch.Tensor, device: torch.device):
    """(encode, decode) closures; both models stream over time in eval mode."""

    def encode():
        with torch.no_grad(), _autocast(device):
            return model.encode(clip).latent_dist.mode()

    def decode():
        with torch.no_grad(), _autocast(device):
            return model.decode(latents).sample

    return encode, decode


# ----------------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------------


def _result(pair: str, config: BenchConfig, device: torch.device, times: dict, peaks: dict, **extra) -> dict:
    return {
        "pair": pair, "config": config.name, "device": device.type, "dtype": "bf16 autocast, fp32 weights",
        "ours_s": times["ours"], "reference_s": times["reference"], "ratio": times["ours"] / times["reference"],
        "ours_peak_mb": peaks["ours"], "reference_peak_mb": peaks["reference"],
        "peak_ratio": peaks["ours"] / peaks["reference"] if peaks["reference"] > 0 else None,
        "warmup": config.warmup, "repeats": config.repeats, "note": config.note, **extra,
    }


def _measure(fns: dict, config: BenchConfig, device: torch.device) -> tuple[dict, dict]:
    times = time_interleaved(fns, device, config.warmup, config.repeats)
    peaks = {name: measure_peak_memory_mb(fn, device) for name, fn in fns.items()}
    return times, peaks


def build_dit_pair(config: BenchConfig, device: torch.device, compile_models: bool = False) -> tuple[dict, dict]:
    """{"ours"|"reference": (forward, train_step)} closures and {"ours"|"reference": model} for a config."""
    from diffusers import WanTransformer3DModel

    from t2v.models.dit import VideoDiT

    ours_config = dit_config(config)
    with torch.device(device):  # initialise on the device: a 1.4B-parameter init on the CPU takes minutes
        models = {
            "ours": randomize_(VideoDiT(**ours_config)),
            "reference": randomize_(WanTransformer3DModel(**wan_transformer_config(ours_config))),
        }
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, *config.latent_shape, generator=generator)
    inputs = {
        "hidden_states": latents.to(device),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": torch.randn(1, config.text_len, ours_config["text_dim"], generator=generator).to(device),
        "target": torch.randn(latents.shape, generator=generator).to(device),
    }
    steps = {}
    for name, model in models.items():
        model.to(device)
        if config.checkpointing:
            model.enable_gradient_checkpointing()
        if compile_models:
            model.compile()
        steps[name] = dit_steps(model, inputs, device)
    return steps, models


def bench_dit(config: BenchConfig, device: torch.device, pairs: tuple[str, ...], compile_models: bool,
              peak_tflops: float | None) -> list[dict]:
    steps, models = build_dit_pair(config, device, compile_models)
    extra = {"ours_params": num_params(models["ours"]), "reference_params": num_params(models["reference"]),
             "compiled": compile_models}
    results = []
    if "dit_forward" in pairs:
        for model in models.values():
            model.eval()
        times, peaks = _measure({name: fwd for name, (fwd, _) in steps.items()}, config, device)
        results.append(_result("dit_forward", config, device, times, peaks, **extra))
    if "dit_train_step" in pairs:
        for model in models.values():
            model.train()
        times, peaks = _measure({name: train for name, (_, train) in steps.items()}, config, device)
        flops = dit_train_flops(dit_config(config), config.latent_shape, config.text_len)
        mfu = {}
        if peak_tflops:
            mfu = {f"{name}_mfu": flops / times[name] / (peak_tflops * 1e12) for name in times}
        results.append(_result("dit_train_step", config, device, times, peaks, model_flops=flops,
                               matmul_tflops=peak_tflops, **mfu, **extra))
    return results


def build_vae_pair(config: BenchConfig, device: torch.device, compile_models: bool = False) -> tuple[dict, dict]:
    """{"ours"|"reference": (encode, decode)} closures and {"ours"|"reference": model} for a config."""
    from diffusers import AutoencoderKLWan

    from t2v.models.vae import CausalVideoVAE
    from t2v.models.vae_utils import latent_shape

    ours_config = vae_config(config)
    with torch.device(device):
        models = {
            "ours": randomize_(CausalVideoVAE(**ours_config)),
            "reference": randomize_(AutoencoderKLWan(**wan_vae_config(ours_config))),
        }
    frames, height, width = config.clip_shape
    t_ratio = 2 ** sum(bool(t) for t in ours_config["temporal_downsample"])
    s_ratio = 2 ** (len(ours_config["block_out_channels"]) - 1)
    if (frames - 1) % 4 or (frames - 1) % t_ratio or height % s_ratio or width % s_ratio:
        raise ValueError(
            f"clip {config.clip_shape} must have 1 + 4k frames (Wan encodes 4-frame chunks), 1 + k * {t_ratio} "
            f"frames and sides divisible by {s_ratio}"
        )
    generator = torch.Generator().manual_seed(0)
    clip = (torch.rand(1, ours_config["in_channels"], frames, height, width, generator=generator) * 2 - 1).to(device)
    latents = torch.randn(1, *latent_shape(models["ours"], frames, height, width), generator=generator).to(device)
    steps = {}
    for name, model in models.items():
        model.to(device).eval()
        if compile_models:
            model.compile()
        steps[name] = vae_steps(model, clip, latents, device)
    return steps, models


def bench_vae(config: BenchConfig, device: torch.device, pairs: tuple[str, ...], compile_models: bool) -> list[dict]:
    steps, models = build_vae_pair(config, device, compile_models)
    extra = {"ours_params": num_params(models["ours"]), "reference_params": num_params(models["reference"]),
             "compiled": compile_models}
    results = []
    for index, pair in enumerate(("vae_encode", "vae_decode")):
        if pair in pairs:
            times, peaks = _measure({name: fns[index] for name, fns in steps.items()}, config, device)
            results.append(_result(pair, config, device, times, peaks, **extra))
    return results


def profile_pair(config: BenchConfig, device: torch.device, pair: str, calls: int = 3, rows: int = 15) -> dict:
    """torch.profiler tables (top ops by self CPU time) of `calls` calls of each side of `pair`, after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    if pair not in PAIRS:
        raise ValueError(f"pair {pair!r} is unknown; choose from {PAIRS}")
    build = build_dit_pair if pair.startswith("dit_") else build_vae_pair
    steps, models = build(config, device)
    index = 0 if pair in ("dit_forward", "vae_encode") else 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, fns in steps.items():
        models[name].train(pair == "dit_train_step")
        fns[index]()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fns[index]()
            synchronize(device)
        tables[name] = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
    return tables


def run_benchmark(
    configs: list[BenchConfig],
    device: torch.device,
    pairs: tuple[str, ...] = PAIRS,
    compile_models: bool = False,
    log: Callable[[str], None] = print,
    on_result: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Measure every pair of every configuration; one result dict per (pair, configuration).

    `on_result(results so far)` is called after each measurement, so a run cut short keeps what it measured.
    """
    unknown = set(pairs) - set(PAIRS)
    if unknown:
        raise ValueError(f"pairs {sorted(unknown)} are unknown; choose from {PAIRS}")
    peak_tflops = matmul_tflops(device) if "dit_train_step" in pairs else None
    if peak_tflops:
        log(f"measured bf16 matmul rate on {device.type}: {peak_tflops:.2f} TFLOP/s")
    results = []
    for config in configs:
        if config.note:
            log(f"[{config.name}] {config.note}")
        dit_pairs = tuple(p for p in pairs if p.startswith("dit_"))
        vae_pairs = tuple(p for p in pairs if p.startswith("vae_"))
        for bench, wanted in ((bench_dit, dit_pairs), (bench_vae, vae_pairs)):
            if not wanted:
                continue
            args = (peak_tflops,) if bench is bench_dit else ()
            for result in bench(config, device, wanted, compile_models, *args):
                log(format_row(result))
                results.append(result)
                if on_result is not None:
                    on_result(results)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

TIME_TARGET = 0.8  # ours at most 0.8x the reference's time
MEMORY_TARGET = 1.0  # ours at most the reference's peak memory

HEADER = (f"{'config':<7} {'pair':<15} {'ours s':>9} {'ref s':>9} {'ratio':>6} {'ours MB':>9} {'ref MB':>9} "
          f"{'mem':>5}  targets")


def format_row(r: dict) -> str:
    mem = r["peak_ratio"]
    ok_time = "time ok" if r["ratio"] <= TIME_TARGET else "time MISS"
    ok_mem = "mem ok" if mem is not None and mem <= MEMORY_TARGET else "mem MISS"
    mem_text = f"{mem:5.2f}" if mem is not None else "  n/a"
    row = (f"{r['config']:<7} {r['pair']:<15} {r['ours_s']:9.4f} {r['reference_s']:9.4f} {r['ratio']:6.2f} "
           f"{r['ours_peak_mb']:9.1f} {r['reference_peak_mb']:9.1f} {mem_text}  {ok_time}, {ok_mem}")
    if r.get("ours_mfu") is not None:
        row += f"  (MFU ours {r['ours_mfu']:.1%}, ref {r['reference_mfu']:.1%})"
    return row


def format_table(results: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in results])


def describe_flops() -> str:
    return " ".join((dit_train_flops.__doc__ or "").split())


"""Peak memory and time per denoising step of each memory preset (`t2v.pipelines.memory`), one process each.

    python benchmarks/memory_presets.py --json benchmarks/results/cpu_memory_presets.json
    python benchmarks/memory_presets.py --layout wan1.3b

A random-weight pipeline of real size: the transformer of preset "1.3b" (or Wan 2.1 1.3B's layout through
`t2v.models.wan.config_from_wan`) and VAE preset "base", sampling one clip (5x64x64 by default: 2 latent frames
of 8x8, 32 tokens) with guidance (a batch of 2 per step) from random text states, so no text encoder is loaded.
Each preset runs in a fresh process, since a process's peak resident memory never goes down. Figures: resident
memory once the pipeline is set up (weights at rest), the peak during sampling (CPU: the resident-set peak,
reset after setup through /proc/self/clear_refs; CUDA: `torch.cuda.max_memory_allocated`), seconds per step
(the median between the pipeline's step callbacks) and seconds to decode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PRESETS = ("fast", "balanced", "low")
# Wan 2.1 T2V 1.3B's transformer config (the keys it sets; the rest are diffusers' defaults).
WAN_1_3B = {"num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
            "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "patch_size": [1, 2, 2]}


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def build_pipeline(layout: str):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from t2v.models.dit import VideoDiT
    from t2v.models.presets import load_preset
    from t2v.models.vae import CausalVideoVAE
    from t2v.models.wan import config_from_wan
    from t2v.pipelines import T2VPipeline

    torch.manual_seed(0)
    dit_config = load_preset("dit_1.3b") if layout == "1.3b" else config_from_wan(WAN_1_3B)
    return T2VPipeline(vae=CausalVideoVAE(**load_preset("vae_base")), transformer=VideoDiT(**dit_config),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def run_one(preset: str, layout: str, device_name: str, frames: int, size: int, steps: int) -> dict:
    """One preset in this process: the figures above, as a dict."""
    import torch

    from t2v.pipelines.memory import apply_memory_preset

    device = torch.device(device_name)
    pipe = build_pipeline(layout)
    pipe.set_progress_bar_config(disable=True)
    apply_memory_preset(pipe, preset, device)
    text_dim = pipe.transformer.config.text_dim
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(1, 32, text_dim, generator=generator)
    negative = torch.randn(1, 32, text_dim, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        at_rest = torch.cuda.memory_allocated(device) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        at_rest = _rss_mb("VmRSS")

    marks = []

    def mark(pipeline, i, t, tensors):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        return tensors

    start = time.perf_counter()
    pipe(prompt_embeds=states.to(device), negative_prompt_embeds=negative.to(device), num_frames=frames,
         height=size, width=size, num_inference_steps=steps, guidance_scale=5.0, generator=generator,
         output_type="pt", callback_on_step_end=mark)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb("VmHWM")
    step_times = [b - a for a, b in zip([start, *marks], marks)]
    return {"preset": preset, "layout": layout, "device": device_name, "clip": f"{frames}x{size}x{size}",
            "steps": steps, "at_rest_mb": round(at_rest), "peak_mb": round(peak),
            "s_per_step": round(statistics.median(step_times), 2), "decode_s": round(end - marks[-1], 2),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Peak memory and time per step of each memory preset.")
    p.add_argument("--layout", choices=["1.3b", "wan1.3b"], default="1.3b",
                   help="transformer: preset 1.3b, or Wan 2.1 1.3B's config converted")
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one preset
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.presets[0], args.layout, args.device, args.frames, args.size, args.steps)))
        return 0
    rows = []
    for preset in args.presets:
        command = [sys.executable, os.path.abspath(__file__), "--one", "--presets", preset, "--layout", args.layout,
                   "--device", args.device, "--frames", str(args.frames), "--size", str(args.size),
                   "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| preset | at rest (MiB) | peak in sampling (MiB) | s / step | decode (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['preset']} | {row['at_rest_mb']} | {row['peak_mb']} | {row['s_per_step']} | {row['decode_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling with `generate.py --compile` (each transformer block compiled) against eager, interleaved in one process.

    python benchmarks/bench_sample_compile.py --json benchmarks/results/cpu_sample_compile.json

Two copies of a pipeline (the shipped default unless --model), one with `t2v.generation.compile_transformer`
applied, sample the same prompt and seed as generate.py does (its default settings: 17x64x64, 30 steps,
guidance 3, so every step runs a batch of 2). The compiled copy's first call, which pays the compilation, is
timed on its own; then calls alternate (A B, B A, ...) and the figures are medians: seconds per denoising step
(between the pipeline's step callbacks) and per whole call (text encoding, denoising, decoding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sampling: eager vs --compile (transformer blocks compiled).")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped default model)")
    p.add_argument("--prompt", default="a large blue square moving up on a white background")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each copy after the first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats} must be at least 1")

    import numpy as np
    import torch

    import t2v
    from t2v.generation import GenerationSettings, check_generation, compile_transformer, sample_videos
    from t2v.pipelines import T2VPipeline

    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    model = args.model or t2v.DEFAULT_MODEL
    pipes = {name: T2VPipeline.from_pretrained(model) for name in ("eager", "compiled")}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    compile_transformer(pipes["compiled"])
    settings = check_generation(pipes["eager"], [args.prompt], [0], GenerationSettings(num_inference_steps=args.steps))

    def call(name: str) -> tuple[float, list[float], np.ndarray]:
        stamps = []
        start = time.perf_counter()
        video = sample_videos(pipes[name], [args.prompt], [0], settings, lambda done, total: stamps.append(
            time.perf_counter()))
        return time.perf_counter() - start, list(np.diff(stamps)), video

    eager_first, _, eager_video = call("eager")
    first_call_s, _, compiled_video = call("compiled")
    calls = {"eager": [], "compiled": []}
    steps = {"eager": [], "compiled": []}
    for round_index in range(args.repeats):
        for name in ("eager", "compiled") if round_index % 2 == 0 else ("compiled", "eager"):
            seconds, step_seconds, _ = call(name)
            calls[name].append(seconds)
            steps[name] += step_seconds
    step_s = {name: statistics.median(values) for name, values in steps.items()}
    call_s = {name: statistics.median(values) for name, values in calls.items()}
    difference = np.abs(eager_video.astype(int) - compiled_video.astype(int)).max()
    result = {
        "model": "shipped default" if args.model is None else args.model,
        "clip": f"{settings.num_frames}x{settings.height}x{settings.width}", "steps": settings.num_inference_steps,
        "guidance": settings.guidance_scale, "machine": f"CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "eager_step_s": step_s["eager"], "compiled_step_s": step_s["compiled"],
        "step_ratio": step_s["compiled"] / step_s["eager"], "eager_call_s": call_s["eager"],
        "compiled_call_s": call_s["compiled"], "eager_first_call_s": eager_first,
        "compiled_first_call_s": first_call_s, "first_call_extra_s": first_call_s - call_s["eager"],
        "max_difference_levels": int(difference), "repeats": args.repeats,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"{result['clip']}, {result['steps']} steps, {result['machine']}: per step eager {step_s['eager']:.3f} s, "
          f"compiled {step_s['compiled']:.3f} s (ratio {result['step_ratio']:.2f}); per call eager "
          f"{call_s['eager']:.2f} s, compiled {call_s['compiled']:.2f} s; first compiled call {first_call_s:.1f} s "
          f"(+{result['first_call_extra_s']:.1f} s); videos differ by at most {difference} of 255")
    if args.json:
        from t2v.eval.report import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our DiT's training step eager against `train.compile=true` (each block compiled), interleaved in one process.

    python benchmarks/bench_train_compile.py --config shapes --batch 32 --json /tmp/compile.json

Two copies of the same randomly initialised `VideoDiT` (a benchmark preset of t2v/bench.py), one with every
block compiled by `t2v.train.trainable.compile_model` as the trainer does, time a forward + backward of an MSE
loss on the same inputs under bf16 autocast; calls alternate (A B, B A, ...) after warm-up, and the figure is
the median. The compiled copy's first call (the compilation) is timed on its own. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="DiT training step: eager vs train.compile (blocks compiled).")
    p.add_argument("--config", default="shapes", help="a t2v/bench.py configuration: tiny, shapes, 300m")
    p.add_argument("--batch", type=int, default=32, help="clips per step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be at least 1")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup} must be at least 0")

    import torch

    from t2v import bench
    from t2v.models.dit import VideoDiT
    from t2v.train.trainable import compile_model

    if args.config not in bench.CONFIGS:
        p.error(f"--config {args.config!r} is not one of {sorted(bench.CONFIGS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    config = bench.CONFIGS[args.config]
    ours = bench.dit_config(config)
    eager = bench.randomize_(VideoDiT(**ours)).to(device).train()
    compiled = compile_model(copy.deepcopy(eager))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, *config.latent_shape, generator=generator)
    inputs = {
        "hidden_states": latents.to(device),
        "timestep": torch.rand(args.batch, generator=generator).mul(1000).to(device),
        "encoder_hidden_states": torch.randn(args.batch, config.text_len, ours["text_dim"],
                                             generator=generator).to(device),
        "target": torch.randn(latents.shape, generator=generator).to(device),
    }
    steps = {"eager": bench.dit_steps(eager, inputs, device)[1], "compiled": bench.dit_steps(compiled, inputs, device)[1]}

    start = time.perf_counter()
    steps["compiled"]()
    bench.synchronize(device)
    first_call_s = time.perf_counter() - start
    times = bench.time_interleaved(steps, device, args.warmup, args.repeats)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    result = {
        "config": args.config, "batch": args.batch, "device": device.type, "machine": machine,
        "torch": torch.__version__, "dtype": "bf16 autocast, fp32 weights", "params": bench.num_params(eager),
        "eager_s": times["eager"], "compiled_s": times["compiled"], "ratio": times["compiled"] / times["eager"],
        "compiled_first_call_s": first_call_s, "warmup": args.warmup, "repeats": args.repeats,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"{args.config} DiT ({result['params'] / 1e6:.1f}M), batch {args.batch}, {machine}: training step "
          f"eager {times['eager']:.3f} s, blocks compiled {times['compiled']:.3f} s "
          f"(ratio {result['ratio']:.2f}; first compiled call {first_call_s:.1f} s)")
    if args.json:
        from t2v.eval.report import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

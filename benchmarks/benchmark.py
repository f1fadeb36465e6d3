"""Benchmark our VideoDiT and CausalVideoVAE against diffusers' Wan models, side by side.

    python benchmarks/benchmark.py --quick                      # shapes + 300m (reduced) on CPU, < 3 min
    python benchmarks/benchmark.py --tiny --json /tmp/b.json    # seconds: the smoke test
    python benchmarks/benchmark.py --device cuda --json b.json  # shapes, 300m, 1.3b on a GPU
    python benchmarks/benchmark.py --generate                   # also time a cold generate.py run

Prints a table (ratio = ours / reference, for time and for peak memory) and with --json writes one object
per measured pair and configuration. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, for generate.py

GENERATE_PROMPT = "a large blue square moving up on a white background"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Our models against diffusers' Wan models: time and peak memory.")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--configs", default=None,
                   help="comma-separated: tiny, shapes, 300m, 1.3b (cuda only); default shapes,300m (+1.3b on cuda)")
    p.add_argument("--pairs", default=None,
                   help="comma-separated subset of dit_forward, dit_train_step, vae_encode, vae_decode")
    p.add_argument("--quick", action="store_true", help="fewer repeats; on CPU a reduced 300m (stated in output)")
    p.add_argument("--tiny", action="store_true", help="the tiny configuration only, one repeat (smoke test)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models of each pair")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--generate", action="store_true", help="also time a cold `generate.py` run (subprocess)")
    p.add_argument("--profile", default=None, metavar="PAIR",
                   help="instead of timing, print torch.profiler tables of both sides of PAIR (e.g. dit_forward) "
                        "for the first configuration")
    p.add_argument("--json", default=None, help="write the results as a JSON list to this file")
    return p


def time_generate(device: str, threads: int | None) -> dict:
    """Wall time of the default generate.py run as a fresh process (imports and model loading included).

    With `threads`, the process runs with OMP_NUM_THREADS=threads (torch's CPU thread count).
    """
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, os.path.join(REPO, "generate.py"), GENERATE_PROMPT, "--out-dir", out_dir,
               "--device", device]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    row = {"pair": "generate_cold", "config": "default", "device": device, "ours_s": seconds,
           "reference_s": None, "ratio": None, "ours_peak_mb": None, "reference_peak_mb": None,
           "note": f"python generate.py {GENERATE_PROMPT!r} --out-dir TMP --device {device}, wall time of a fresh process"
                   + (f", OMP_NUM_THREADS={threads}" if threads else "")}
    if proc.returncode != 0:
        row.update(ours_s=None, error=f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return row


def write_json(path: str | None, rows: list[dict], machine: str) -> None:
    """Write the results so far (each with torch version and machine) to `path`, if given."""
    if not path:
        return
    import torch

    for row in rows:
        row.update(torch=torch.__version__, machine=machine, threads=torch.get_num_threads())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from t2v import bench

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for but CUDA is not available")
    device = torch.device(device_name)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    if args.tiny:
        names = ["tiny"]
    elif args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
    else:
        names = ["shapes", "300m"] + (["1.3b"] if device.type == "cuda" else [])
    pairs = tuple(p.strip() for p in args.pairs.split(",")) if args.pairs else bench.PAIRS
    try:
        configs = bench.resolve_configs(names, device, args.quick)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        if args.profile:
            for name, table in bench.profile_pair(configs[0], device, args.profile).items():
                print(f"\n== {args.profile} [{configs[0].name}] {name} ==\n{table}")
            return 0
        print(f"torch {torch.__version__} on {machine}; bf16 autocast with fp32 weights on both sides; "
              f"ratio = ours / diffusers Wan; median of interleaved repeats")
        print(bench.HEADER)
        results = bench.run_benchmark(configs, device, pairs, compile_models=args.compile,
                                      on_result=lambda rows: write_json(args.json, rows, machine))
    except ValueError as e:
        parser.error(str(e))
    print("\nDiT training-step model FLOPs: " + bench.describe_flops())
    print("\n" + bench.format_table(results))
    if args.generate:
        row = time_generate(device.type, args.threads)
        if row["ours_s"] is None:
            print(f"\ncold generate.py ({device.type}) failed, not timed: {row['error']}")
        else:
            print(f"\ncold generate.py ({device.type}): {row['ours_s']:.1f} s wall, one fresh process")
        results.append(row)
    write_json(args.json, results, machine)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak CPU memory per rank while a DeepSpeed ZeRO run saves a checkpoint: "full" against "sharded".

    python benchmarks/checkpoint_memory.py --json benchmarks/results/cpu_checkpoint_memory.json

Each (format, stage) runs as its own 2-process `torchrun` launch on the CPU (gloo), since a process's peak
resident memory never goes down. A launch builds a random VideoDiT (hidden 768, 12 layers: 120M parameters,
fp32), hands it to the trainer's ZeRO backend with an EMA, takes one update (so AdamW has its moments), then
saves as the trainer does: "full" gathers the whole state on every rank and rank 0 writes it
(`backend.full_state`, `ema.state`, `checkpoint.save_checkpoint`); "sharded" streams it and each rank writes
its share (`backend.state_stream`, `checkpoint.save_sharded`), with shard files of `SHARD_BYTES` or of
64 MiB. The figure is each rank's resident-set peak during the save (VmHWM, reset just before it through
/proc/self/clear_refs) minus its resident memory just before. The JSON also holds the per-rank bytes that
the same accounting gives for Wan 2.1 1.3B and 14B (`per_rank_table`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "configs", "train", "debug.yaml")
MODEL = dict(in_channels=4, patch_size=(1, 2, 2), hidden_size=768, num_layers=12, num_heads=12, text_dim=16,
             pooled_dim=16, attention_layout="full")
RUNS = [("full", 2, 0), ("sharded", 2, 0), ("sharded", 2, 64), ("full", 3, 0), ("sharded", 3, 0), ("sharded", 3, 64)]
# Wan 2.1 T2V parameter counts, and the largest single tensor of each (the feed-forward matrix, dim x ffn_dim).
WAN = {"1.3B": (1_418_996_800, 1536 * 8960), "14B": (14_288_491_584, 5120 * 13824)}
GIB = 1024**3


def per_rank_table(ranks: tuple[int, ...] = (1, 8, 64)) -> list[dict]:
    """GiB per rank for Wan 1.3B and 14B: training state (bf16 weights, fp32 master, 2 fp32 AdamW moments;
    gradients and activations left out) per ZeRO stage, and what a save adds on top of it."""
    rows = []
    for name, (params, largest) in WAN.items():
        for n in ranks:
            rows.append({
                "model": name, "ranks": n,
                # ZeRO-1/2 partition master and moments (12 B); every rank keeps whole bf16 weights (2 B).
                "zero12_state_gib": round(params * (2 + 12 / n) / GIB, 2),
                # ZeRO-3 partitions the bf16 weights too.
                "zero3_state_gib": round(params * 14 / n / GIB, 2),
                # Old save: whole fp32 master + 2 moments on every rank, and the whole fp32 EMA on rank 0.
                "save_full_gib": round(params * 16 / GIB, 2),
                # Sharded save: the rank's share (master, moments, EMA: 16 B over N ranks) but at most one shard
                # file being filled (SHARD_BYTES), plus the tensor being gathered (fp32, gathered and copied).
                "save_sharded_gib": round((min(params * 16 / n, GIB) + 2 * 4 * largest) / GIB, 2),
            })
    return rows


RANK = """
import json, os, sys, torch, torch.distributed as dist
from t2v.config import load_config
from t2v.models.dit import VideoDiT
from t2v.parallel.backend import build_backend
from t2v.parallel.distributed import init_distributed
from t2v.train import checkpoint as ckpt
from t2v.train.optim import EMA, build_adamw, build_lr_scheduler, param_groups
import functools

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))

out, fmt, stage, part_mib, model_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rank, _ = init_distributed()
cfg = load_config(sys.argv[6], [f"output_dir={out}", "distributed.backend=deepspeed", f"distributed.zero_stage={stage}",
                                "train.ema_decay=0.99", "data.batch_size=1", f"train.checkpoint_format={fmt}"])
torch.manual_seed(0)
model = VideoDiT(**json.loads(model_json))
params = [(n, p) for n, p in model.named_parameters()]
n = sum(p.numel() for _, p in params)  # before ZeRO-3 partitions them
backend = build_backend(model, params, param_groups(params, cfg.train), cfg, torch.device("cpu"),
                        make_optimizer=functools.partial(build_adamw, cfg=cfg.train),
                        make_scheduler=functools.partial(build_lr_scheduler, cfg=cfg.train), make_ema=EMA)
x, t = torch.randn(1, 4, 1, 4, 4), torch.tensor([500.0])
text, mask, pooled = torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 16)
loss = backend.forward_model(x, t, text, mask, pooled).sample.square().mean()
backend.backward(loss, True)
backend.step(loss.item())
backend.ema.step()
root = ckpt.checkpoint_root(out)
import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)
dist.barrier()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
if fmt == "sharded":
    stream, meta = backend.state_stream()
    ckpt.save_sharded(root, 1, stream, {}, meta, max_bytes=(part_mib << 20) or ckpt.SHARD_BYTES)
else:
    model_state, opt_state = backend.full_state()
    ema_state = backend.ema.state()
    if rank == 0:
        tensors, meta = ckpt.flatten_optimizer_state(opt_state)
        ckpt.save_checkpoint(root, 1, {"model": model_state, "optimizer": tensors, "ema": ema_state[0]}, {})
    dist.barrier()
peak = status("VmHWM")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "rss_before_mib": round(before, 1), "peak_mib": round(peak, 1),
               "save_extra_mib": round(peak - before, 1), "params": n}, f)
"""


def launch(fmt: str, stage: int, part_mib: int, folder: str) -> list[dict]:
    out = os.path.join(folder, f"{fmt}_zero{stage}_{part_mib}")
    os.makedirs(out)
    script = os.path.join(folder, "rank.py")
    with open(script, "w") as f:
        f.write(RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(29500 + 7 * stage + part_mib % 5 + (fmt == "full")), script, out, fmt, str(stage),
           str(part_mib), json.dumps(MODEL), DEBUG]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return [json.load(open(os.path.join(out, f"rank{rank}.json"))) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    import torch

    from t2v.eval.report import write_json

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for fmt, stage, part_mib in RUNS:
            ranks = launch(fmt, stage, part_mib, folder)
            row = {"format": fmt, "zero_stage": stage, "shard_file_mib": part_mib or 1024, "ranks": ranks}
            print(json.dumps(row))
            results.append(row)
    n = results[0]["ranks"][0]["params"]
    report = {
        "machine": f"2-core CPU, torch {torch.__version__}, 2 processes (gloo)",
        "model": {**MODEL, "params": n, "fp32_state_mib": round(n * 16 / 2**20, 1)},
        "runs": results,
        "per_rank_table": per_rank_table(),
    }
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()

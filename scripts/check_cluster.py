"""Check a multi-process launch before training on it; run it under the same launcher as training:

    torchrun --nproc_per_node 8 scripts/check_cluster.py --config examples/shapes_world/configs/shapes_dit.yaml \\
        [key=value ...]

Every rank must reach the others (all-reduce of rank ids), see the GPUs it expects (one per local
process on CUDA; none on CPU), and agree on the world size and on the hash of the resolved config
(--config plus overrides). Then an all-reduce is timed. Any fault exits 1 within seconds, naming the
ranks involved.
"""

import argparse
import datetime
import hashlib
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from t2v.cli import user_errors
from t2v.config import load_config
from t2v.parallel.distributed import init_distributed


def config_hash(path: str, overrides: list[str]) -> str:
    """sha256 (12 hex digits) of the resolved config as YAML."""
    resolved = OmegaConf.to_yaml(OmegaConf.structured(load_config(path, overrides)))
    return hashlib.sha256(resolved.encode()).hexdigest()[:12]


def fail(rank: int, message: str) -> None:
    print(f"[rank {rank}] CLUSTER CHECK FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training YAML the run will use")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="collective timeout in seconds")
    parser.add_argument("--megabytes", type=float, default=16.0, help="all-reduce size to time")
    parser.add_argument("overrides", nargs="*", help="the run's key=value overrides")
    args = parser.parse_args()
    if not args.timeout_s > 0 or not args.megabytes > 0 or not math.isfinite(args.timeout_s + args.megabytes):
        parser.exit(2, f"check_cluster.py: error: --timeout-s {args.timeout_s} and --megabytes {args.megabytes} "
                       "must be positive and finite\n")
    with user_errors(__file__):  # the config is checked before joining anything
        config_hash(args.config, args.overrides)
    if "WORLD_SIZE" not in os.environ:
        fail(0, "not started by a launcher (no WORLD_SIZE); run under torchrun, the deepspeed launcher or srun")

    # 1. join as training does: gloo on CPU, nccl with one GPU per local process on CUDA
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count()
    if torch.cuda.is_available() and gpus < local_world:
        fail(int(os.environ["RANK"]), f"{socket.gethostname()} sees {gpus} GPUs for {local_world} local processes")
    start = time.perf_counter()
    rank, world = init_distributed(timeout=datetime.timedelta(seconds=args.timeout_s))
    backend = dist.get_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")

    # 2. reachability: the sum of rank ids is known
    ids = torch.tensor([float(rank)], device=device)
    dist.all_reduce(ids)
    if int(ids.item()) != world * (world - 1) // 2:
        fail(rank, f"all-reduce of rank ids gave {int(ids.item())}, expected {world * (world - 1) // 2}")

    # 3. agreement on world size, config hash; GPU inventory
    mine = {"rank": rank, "host": socket.gethostname(), "world_env": int(os.environ["WORLD_SIZE"]), "gpus": gpus,
            "device": torch.cuda.get_device_name(local_rank) if gpus else "cpu",
            "config_hash": config_hash(args.config, args.overrides)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    sizes = {info["world_env"] for info in everyone}
    if sizes != {world}:
        fail(rank, "ranks disagree on the world size: " + ", ".join(f"rank {i['rank']}: {i['world_env']}"
                                                                  for i in everyone))
    hashes = {}
    for info in everyone:
        hashes.setdefault(info["config_hash"], []).append(info["rank"])
    if len(hashes) > 1:
        fail(rank, "config hash mismatch (same --config and overrides on every node?): "
             + "; ".join(f"ranks {ranks}: {digest}" for digest, ranks in hashes.items()))

    # 4. bandwidth of an all-reduce
    numel = int(args.megabytes * 2**20 / 4)
    payload = torch.ones(numel, device=device)
    dist.all_reduce(payload)  # warm-up
    iterations = 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(payload)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - tic) / iterations
    # Bus bandwidth as nccl-tests reports it: 2 (n - 1) / n of the buffer crosses each link.
    busbw = 2 * (world - 1) / world * numel * 4 / seconds / 1e9
    dist.barrier()
    if rank == 0:
        hosts = sorted({info["host"] for info in everyone})
        print(f"cluster ok: {world} ranks on {len(hosts)} host(s) {hosts}, backend {backend}, "
              f"config {next(iter(hashes))}, join {time.perf_counter() - start:.1f} s")
        for info in everyone:
            print(f"  rank {info['rank']}: {info['host']} {info['gpus']} GPU(s) {info['device']}")
        print(f"all-reduce {args.megabytes:g} MB: {seconds * 1e3:.2f} ms, bus bandwidth {busbw:.2f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Multi-process training on CPU (gloo): real `torchrun` launches of the debug config on a tiny dataset.

Equivalence rule: 2 ranks x batch b and 1 rank x batch b x grad_accum 2 consume the same global batches
(the sampler counts global batches) with the same noise (the generator is reseeded per global
micro-batch), so their weights agree up to float summation order.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "train" / "debug.yaml")
STEPS = 4  # checkpoints at 2 and 4

# Trains like scripts/train.py, then each rank writes the weights it holds (ZeRO-3: gathered).
RANK_DUMP = """
import contextlib, sys
from safetensors.torch import save_file
from t2v.config import load_config
from t2v.train import trainer
from t2v.train.dit import DiTTask
cfg = load_config(sys.argv[1], sys.argv[2:])
task = DiTTask(cfg)
trainer.train(cfg, task)
rank, _ = trainer.dist_info()
params = list(task.model.parameters())
context = contextlib.nullcontext()
if any(hasattr(p, "ds_id") for p in params):
    import deepspeed
    context = deepspeed.zero.GatheredParameters(params)
with context:
    weights = {k: v.detach().float().cpu().contiguous() for k, v in task.model.state_dict().items()}
save_file(weights, f"{cfg.output_dir}/rank{rank}.safetensors")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), T2V_DIST_TIMEOUT_MINUTES="3")
    out.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "t2v_torch_extensions"))
    return out


def run(cmd: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    print("launch:", " ".join(cmd))
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def train(nproc: int, out: Path, manifest: str, script: str, *overrides: str) -> Path:
    args = [script, DEBUG, f"data.manifest={manifest}", f"output_dir={out}", f"train.max_steps={STEPS}",
            "train.ckpt_every=2", "train.log_every=1", *overrides]
    if script.endswith("train.py"):
        args = [script, "--config", *args[1:]]
    run((torchrun(nproc) if nproc > 1 else [sys.executable]) + args)
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def assert_close(a: dict, b: dict, atol: float, what: str) -> None:
    assert a.keys() == b.keys(), what
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{what}: max |diff| = {worst:.3g}")
    assert worst <= atol, f"{what}: max |diff| {worst} > {atol}"


def checkpoint(out: Path, step: int, group: str) -> dict[str, torch.Tensor]:
    return weights(out / "checkpoints" / f"step-{step}" / f"{group}.safetensors")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from t2v.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("dist")
    (root / "rank_dump.py").write_text(RANK_DUMP)
    manifest = str(write_dataset(root / "clips", num=8, seed=0))
    return root, manifest


@pytest.fixture(scope="module")
def reference(workdir):
    """One process, batch 2 x grad_accum 2: the global batch of 2 ranks x batch 2."""
    root, manifest = workdir
    return train(1, root / "single", manifest, str(root / "rank_dump.py"), "train.grad_accum=2")


@pytest.fixture(scope="module")
def ddp_run(workdir):
    root, manifest = workdir
    return train(2, root / "ddp", manifest, str(root / "rank_dump.py"), "distributed.backend=ddp")


def test_ddp_ranks_agree_and_match_one_process(ddp_run, reference):
    rank0, rank1 = weights(ddp_run / "rank0.safetensors"), weights(ddp_run / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "DDP ranks hold different weights"
    single = weights(reference / "rank0.safetensors")
    assert_close(rank0, single, 1e-5, "ddp 2x2 vs 1x2x2")
    assert_close(checkpoint(ddp_run, STEPS, "optimizer"), checkpoint(reference, STEPS, "optimizer"), 1e-5,
                 "optimizer state")
    # The run trained: weights moved away from the step-2 checkpoint.
    assert any(not torch.equal(checkpoint(ddp_run, 2, "model")[k], rank0[k]) for k in rank0)


def test_launch_without_backend_is_refused(workdir):
    root, manifest = workdir
    done = run(torchrun(2) + ["scripts/train.py", "--config", DEBUG, f"data.manifest={manifest}",
                              f"output_dir={root / 'refused'}"], check=False)
    assert done.returncode != 0 and "distributed.backend='none'" in done.stderr

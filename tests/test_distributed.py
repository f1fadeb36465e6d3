"""Multi-process training on CPU (gloo): real `torchrun` launches of the debug config on a tiny dataset.

Equivalence rule: 2 ranks x batch b and 1 rank x batch b x grad_accum 2 consume the same global batches
(the sampler counts global batches) with the same noise (the generator is reseeded per global
micro-batch), so their weights agree up to float summation order.
"""

import json
import os
import socket
import subprocess
import sys
import time
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
from t2v.parallel.distributed import init_distributed
from t2v.train import trainer
from t2v.train.dit_task import DiTTask
cfg = load_config(sys.argv[1], sys.argv[2:])
rank, _ = init_distributed(cfg.distributed.sequence_parallel_size)  # before the task shards its data
task = DiTTask(cfg)
trainer.train(cfg, task)
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
    """A tensor group of a checkpoint, whole: one file ("full") or every rank's shard files ("sharded")."""
    from t2v.train.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(str(out / "checkpoints" / f"step-{step}"))
    return {k: v.float() for k, v in tensors[group].items()}


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


def test_ddp_with_compiled_blocks_matches_one_process(workdir, reference):
    """train.compile=true under DDP: the blocks are compiled before DDP wraps the model."""
    root, manifest = workdir
    out = train(2, root / "ddp_compiled", manifest, str(root / "rank_dump.py"), "distributed.backend=ddp",
                "train.compile=true")
    rank0, rank1 = weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "DDP ranks hold different weights"
    assert_close(rank0, weights(reference / "rank0.safetensors"), 1e-4, "compiled ddp 2x2 vs eager 1x2x2")


def test_sequence_parallel_launch_checks(tmp_path):
    from t2v.config import load_config
    from t2v.parallel.distributed import check_launch
    from t2v.train import trainer

    cfg = load_config(DEBUG, [f"output_dir={tmp_path}", "distributed.backend=ddp", "distributed.sequence_parallel_size=2"])
    with pytest.raises(ValueError, match="world size 1 is not divisible by distributed.sequence_parallel_size=2"):
        trainer.train(cfg, task=None)  # one process
    with pytest.raises(ValueError, match="world size 3 is not divisible by distributed.sequence_parallel_size=2"):
        check_launch(load_config(DEBUG, ["distributed.backend=ddp", "distributed.sequence_parallel_size=2"]).distributed, 3)
    with pytest.raises(ValueError, match="sequence_parallel_size=2 needs distributed.backend=ddp or deepspeed"):
        check_launch(load_config(DEBUG, ["distributed.sequence_parallel_size=2"]).distributed, 1)
    with pytest.raises(ValueError, match="the process group was joined with 1; call init_distributed"):
        check_launch(load_config(DEBUG, ["distributed.backend=ddp", "distributed.sequence_parallel_size=2"]).distributed, 2)
    from t2v.parallel.deepspeed_engine import initialize

    with pytest.raises(ValueError, match="sequence_parallel_size=2 with distributed.zero_stage=3"):
        initialize(None, [], None, None, load_config(DEBUG, ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                                                       "distributed.sequence_parallel_size=2"]), 2)


def test_a_launch_that_was_not_joined_is_refused(monkeypatch):
    """Under a launcher, reading the layout before `init_distributed` is an error, not one silent process."""
    from t2v.parallel.distributed import data_parallel_info

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="call init_distributed"):
        data_parallel_info()


def test_launch_without_backend_is_refused(workdir):
    root, manifest = workdir
    done = run(torchrun(2) + ["scripts/train.py", "--config", DEBUG, f"data.manifest={manifest}",
                              f"output_dir={root / 'refused'}"], check=False)
    assert done.returncode != 0 and "distributed.backend='none'" in done.stderr


# ----------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero2_run(workdir):
    root, manifest = workdir
    return train(2, root / "zero2", manifest, str(root / "rank_dump.py"), "distributed.backend=deepspeed",
                 "distributed.zero_stage=2", "distributed.deepspeed_config=configs/deepspeed/zero2.json")


def test_zero2_ranks_agree_and_match_one_process(zero2_run, reference):
    rank0, rank1 = weights(zero2_run / "rank0.safetensors"), weights(zero2_run / "rank1.safetensors")
    assert_close(rank0, rank1, 0.0, "zero2 rank 0 vs rank 1")
    assert_close(checkpoint(zero2_run, STEPS, "model"), checkpoint(reference, STEPS, "model"), 1e-5,
                 "zero2 2x2 vs 1x2x2 (checkpoint, fp32 masters)")
    assert_close(checkpoint(zero2_run, STEPS, "optimizer"), checkpoint(reference, STEPS, "optimizer"), 1e-5,
                 "zero2 optimizer state (whole AdamW moments)")
    assert_close(checkpoint(zero2_run, STEPS, "ema"), checkpoint(reference, STEPS, "ema"), 1e-5, "zero2 EMA")
    # Sharded by default under ZeRO: each rank wrote its share; state.json lists every file with its checksum.
    folder = zero2_run / "checkpoints" / f"step-{STEPS}"
    shards = sorted(path.name for path in folder.glob("*.safetensors"))
    assert [name for name in shards if name.startswith("model.")] == ["model.00000-000.safetensors",
                                                                      "model.00001-000.safetensors"]
    assert sorted(json.loads((folder / "state.json").read_text())["_files"]) == shards


# RANK_DUMP with a NaN loss on one rank's loss call number `call` (0-based, counted per process).
NAN_ONCE = """
import os
from t2v.train.dit_task import DiTTask
_loss, _calls = DiTTask.loss, []
def _nan_once(self, model, batch, generator):
    out = _loss(self, model, batch, generator)
    _calls.append(None)
    if len(_calls) - 1 == {call} and int(os.environ.get("RANK", "0")) == {rank}:
        out.loss = out.loss * float("nan")
    return out
DiTTask.loss = _nan_once
"""


def test_zero2_skips_a_nonfinite_step_like_one_process(workdir):
    """A NaN loss on rank 1 alone at step 2: both ZeRO-2 ranks skip that update, log it, go on to the end and
    agree; one process meeting the same NaN in the same global micro-batch ends with the same weights."""
    from t2v.train.logger import read_metrics

    root, manifest = workdir
    (root / "nan_rank1.py").write_text(NAN_ONCE.format(call=2, rank=1) + RANK_DUMP)
    (root / "nan_single.py").write_text(NAN_ONCE.format(call=5, rank=0) + RANK_DUMP)  # step 2, micro-batch 1
    out = train(2, root / "zero2_nan", manifest, str(root / "nan_rank1.py"), "distributed.backend=deepspeed",
                "distributed.zero_stage=2", "distributed.deepspeed_config=configs/deepspeed/zero2.json")
    single = train(1, root / "single_nan", manifest, str(root / "nan_single.py"), "train.grad_accum=2")
    for run_dir in (out, single):
        rows = read_metrics(str(run_dir))
        skipped = [row for row in rows if row.get("skipped_nonfinite")]
        assert [row["step"] for row in skipped] == [2] and skipped[0]["nonfinite_in_a_row"] == 1, run_dir
        assert max(row["step"] for row in rows) == STEPS
    assert_close(weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors"), 0.0, "zero2 nan ranks")
    for group in ("model", "optimizer", "ema"):
        assert_close(checkpoint(out, STEPS, group), checkpoint(single, STEPS, group), 1e-5, f"zero2 nan {group}")
    state = json.loads((out / "checkpoints" / f"step-{STEPS}" / "state.json").read_text())
    assert state["lr_scheduler"]["last_epoch"] == STEPS  # the skipped update did not move the schedule


def test_zero2_with_accumulation_and_the_trainers_adamw_matches_one_process(workdir):
    """ZeRO-2 without a DeepSpeed JSON (so the trainer's own AdamW) and 2 accumulation steps: 2 ranks x batch 1 x
    grad_accum 2 take the same global micro-batches with the same noise as 1 process x batch 1 x grad_accum 4."""
    root, manifest = workdir
    out = train(2, root / "zero2_accum", manifest, str(root / "rank_dump.py"), "distributed.backend=deepspeed",
                "distributed.zero_stage=2", "data.batch_size=1", "train.grad_accum=2")
    single = train(1, root / "single_accum", manifest, str(root / "rank_dump.py"), "data.batch_size=1",
                   "train.grad_accum=4")
    assert_close(weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors"), 0.0, "zero2 accum ranks")
    for group in ("model", "optimizer", "ema"):
        worst = relative_diff(checkpoint(out, STEPS, group), checkpoint(single, STEPS, group))
        print(f"ZeRO-2 2x1x2 vs 1x1x4, {group}: max relative diff {worst:.3g}")
        assert worst <= 1e-5, group


def test_zero3_ranks_agree_and_match_one_process(workdir, reference):
    root, manifest = workdir
    out = train(2, root / "zero3", manifest, str(root / "rank_dump.py"), "distributed.backend=deepspeed",
                "distributed.zero_stage=3", "distributed.deepspeed_config=configs/deepspeed/zero3.json")
    assert_close(weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors"), 0.0, "zero3 ranks")
    assert_close(checkpoint(out, STEPS, "model"), checkpoint(reference, STEPS, "model"), 1e-5, "zero3 vs 1x2x2")
    assert_close(checkpoint(out, STEPS, "optimizer"), checkpoint(reference, STEPS, "optimizer"), 1e-5,
                 "zero3 optimizer state")
    # The EMA, sharded over the ranks' master partitions, averages the same weights; the export swaps it in.
    assert_close(checkpoint(out, STEPS, "ema"), checkpoint(reference, STEPS, "ema"), 1e-5, "zero3 EMA")
    exported = "pipeline/transformer/diffusion_pytorch_model.safetensors"
    assert_close(weights(out / exported), weights(reference / exported), 1e-5, "zero3 exported EMA weights")



def test_zero3_with_cpu_offload_matches_one_process(workdir, reference):
    # ZeRO-Offload of optimizer states and ZeRO-3 parameters to CPU memory (torch's AdamW steps the offloaded
    # partitions): the same training as one process, only where the tensors live changes.
    root, manifest = workdir
    out = train(2, root / "zero3_offload", manifest, str(root / "rank_dump.py"), "distributed.backend=deepspeed",
                "distributed.zero_stage=3", "distributed.deepspeed_config=configs/deepspeed/zero3.json",
                "distributed.offload_optimizer=true", "distributed.offload_params=true")
    assert_close(weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors"), 0.0, "offload ranks")
    for group in ("model", "optimizer", "ema"):
        assert_close(checkpoint(out, STEPS, group), checkpoint(reference, STEPS, group), 1e-5, f"offload {group}")

def test_zero_ema_refuses_what_it_cannot_follow(tmp_path):
    from types import SimpleNamespace

    from t2v.config import load_config
    from t2v.parallel.deepspeed_engine import initialize
    from t2v.parallel.zero_ema import master_partitions

    checks = tmp_path / "zero3_checks.json"
    checks.write_text(json.dumps({"zero_optimization": {"stage": 3, "enable_sanity_checks": True}}))
    cfg = load_config(DEBUG, ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                              f"distributed.deepspeed_config={checks}"])
    with pytest.raises(ValueError, match="enable_sanity_checks"):
        initialize(None, [], None, None, cfg, 2)
    nvme = SimpleNamespace(swap_optimizer=True, fp32_partitioned_groups_flat=[torch.empty(0)])
    with pytest.raises(ValueError, match="NVMe"):
        master_partitions(SimpleNamespace(optimizer=nvme))
    empty = SimpleNamespace(single_partition_of_fp32_groups=[torch.zeros(4), torch.empty(0)])
    with pytest.raises(ValueError, match="empty"):
        master_partitions(SimpleNamespace(optimizer=empty))
    bf16 = SimpleNamespace(fp32_groups_flat_partition=[torch.zeros(3)])  # DeepSpeed's BF16_Optimizer
    assert master_partitions(SimpleNamespace(optimizer=bf16)) == bf16.fp32_groups_flat_partition
    with pytest.raises(ValueError, match="needs a ZeRO optimizer"):
        master_partitions(SimpleNamespace(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)))


def test_deepspeed_config_auto_values_and_conflicts():
    from t2v.config import load_config
    from t2v.parallel.deepspeed_engine import fill_config, load_json

    cfg = load_config(DEBUG, ["train.grad_accum=3", "train.mixed_precision=bf16", "distributed.zero_stage=2",
                                "distributed.backend=deepspeed"])
    ds = fill_config(load_json(str(ROOT / "configs" / "deepspeed" / "zero2.json")), cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr and ds["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ValueError, match="zero_stage=3"):
        fill_config({"zero_optimization": {"stage": 2}}, load_config(DEBUG, ["distributed.zero_stage=3",
                                                                               "distributed.backend=deepspeed"]), 1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        fill_config({"gradient_accumulation_steps": 8}, cfg, 1)
    offload = load_config(DEBUG, ["distributed.zero_stage=3", "distributed.offload_optimizer=true",
                                  "distributed.offload_params=true", "distributed.backend=deepspeed"])
    ds = fill_config(load_json(str(ROOT / "configs" / "deepspeed" / "zero3.json")), offload, world_size=2)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"} and ds["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ValueError, match="offload_params=true needs distributed.zero_stage=3"):
        fill_config({}, load_config(DEBUG, ["distributed.zero_stage=2", "distributed.offload_params=true",
                                            "distributed.backend=deepspeed"]), 1)


# ----------------------------------------------------------------------------------------------------
# Resume across topologies: same model, optimizer state, data position
# ----------------------------------------------------------------------------------------------------


def resume(nproc: int, source: Path, out: Path, manifest: str, *overrides: str) -> Path:
    return train(nproc, out, manifest, "scripts/train.py", f"resume={source / 'checkpoints' / 'step-2'}",
                 *overrides)


def assert_same_run(a: Path, b: Path, what: str) -> None:
    for group in ("model", "optimizer", "ema"):
        assert_close(checkpoint(a, STEPS, group), checkpoint(b, STEPS, group), 1e-5, f"{what} {group}")
    state_a, state_b = (json.loads((run / "checkpoints" / f"step-{STEPS}" / "state.json").read_text())
                        for run in (a, b))
    assert state_a["task"] == state_b["task"] and state_a["train_state"] == state_b["train_state"]
    assert state_a["lr_scheduler"]["last_epoch"] == state_b["lr_scheduler"]["last_epoch"] == STEPS


def test_resume_two_processes_on_one(workdir, ddp_run):
    root, manifest = workdir
    out = resume(1, ddp_run, root / "resume_2to1", manifest, "train.grad_accum=2")
    assert_same_run(out, ddp_run, "2 -> 1")


def test_resume_one_process_on_two(workdir, reference):
    root, manifest = workdir
    out = resume(2, reference, root / "resume_1to2", manifest, "distributed.backend=ddp")
    assert_same_run(out, reference, "1 -> 2")


def test_resume_one_process_on_zero3(workdir, reference):
    root, manifest = workdir
    out = resume(2, reference, root / "resume_zero3", manifest, "distributed.backend=deepspeed",
                 "distributed.zero_stage=3", "distributed.deepspeed_config=configs/deepspeed/zero3.json")
    assert_same_run(out, reference, "1 -> zero3")


def test_zero2_bf16_resume_is_exact(workdir):
    """ZeRO-2 in bf16, interrupted at step 2 and resumed: the fp32 masters and moments go back into the partitions."""
    root, manifest = workdir
    zero2_bf16 = ("distributed.backend=deepspeed", "distributed.zero_stage=2", "train.mixed_precision=bf16",
                  "distributed.deepspeed_config=configs/deepspeed/zero2.json")
    straight = train(2, root / "bf16_straight", manifest, "scripts/train.py", *zero2_bf16)
    resumed = resume(2, straight, root / "bf16_resumed", manifest, *zero2_bf16)
    model = checkpoint(straight, STEPS, "model")
    from t2v.train.checkpoint import load_checkpoint

    saved, _ = load_checkpoint(str(straight / "checkpoints" / f"step-{STEPS}"))
    for group in ("model", "ema"):  # fp32 masters, and an EMA kept over them, not over the module's bf16 copies
        assert all(value.dtype == torch.float32 for value in saved[group].values()), group
    assert_same_run(resumed, straight, "zero2 bf16 resume")
    assert any(not torch.equal(checkpoint(straight, 2, "model")[k], model[k]) for k in model)


def test_resume_zero2_on_one_process_without_deepspeed(workdir, zero2_run, reference):
    root, manifest = workdir
    out = resume(1, zero2_run, root / "resume_zero2", manifest, "train.grad_accum=2")
    assert_same_run(out, reference, "zero2 (2) -> plain (1)")


# ----------------------------------------------------------------------------------------------------
# Ulysses sequence parallelism
# ----------------------------------------------------------------------------------------------------

SEQUENCE_CHECK = """
import json, sys, torch, torch.distributed as dist
from t2v.models.attention import attention
from t2v.models.dit import VideoDiT
from t2v.parallel.distributed import init_distributed
from t2v.parallel.sequence import SequenceParallelDiT, ulysses_attention
rank, world = init_distributed()
torch.manual_seed(0)
# 1. the attention hook alone: token shards in, token shards out
q, k, v = (torch.randn(2, 4, 12, 8) for _ in range(3))
n = 12 // world
local = ulysses_attention()(*(t[:, :, rank * n:(rank + 1) * n] for t in (q, k, v)))
full = attention(q, k, v)
results = {"attention": (local - full[:, :, rank * n:(rank + 1) * n]).abs().max().item()}
# 2. a whole DiT forward and backward (nonzero weights: the zero-initialised output would hide errors)
model = VideoDiT(in_channels=4, patch_size=(1, 2, 2), hidden_size=32, num_layers=2, num_heads=2, text_dim=16,
                 pooled_dim=16, attention_layout="full")
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
x, t = torch.randn(2, 4, 3, 8, 8), torch.tensor([100.0, 700.0])
text, mask, pooled = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool(), torch.randn(2, 16)
reference = model(x, t, text, mask, pooled).sample
reference.square().mean().backward()
grads = {name: p.grad.clone() for name, p in model.named_parameters()}
model.zero_grad()
out = SequenceParallelDiT(model)(x, t, text, mask, pooled).sample
out.square().mean().backward()
results["forward"] = (out - reference).abs().max().item()
worst = 0.0
for name, p in model.named_parameters():
    dist.all_reduce(p.grad)  # each rank holds its tokens' share
    worst = max(worst, (p.grad - grads[name]).abs().max().item())
results["grad"] = worst
# 3. refusals: a token count not divisible by P, a factorized layout
try:
    SequenceParallelDiT(model)(torch.randn(1, 4, 1, 6, 6), t[:1], text[:1], mask[:1], pooled[:1])  # 9 tokens
except ValueError as error:
    results["odd_tokens_error"] = str(error)
try:
    SequenceParallelDiT(VideoDiT(in_channels=4, patch_size=(1, 2, 2), hidden_size=32, num_layers=1, num_heads=2,
                                 text_dim=16, attention_layout="factorized"))
except ValueError as error:
    results["factorized_error"] = str(error)
with open(f"{sys.argv[1]}/sequence_rank{rank}.txt", "w") as f:
    f.write(json.dumps(results))
"""


def test_ulysses_attention_and_sequence_parallel_dit(workdir):
    root, _ = workdir
    script = root / "sequence_check.py"
    script.write_text(SEQUENCE_CHECK)
    run(torchrun(2) + [str(script), str(root)])
    for rank in range(2):
        results = json.loads((root / f"sequence_rank{rank}.txt").read_text())
        print(f"rank {rank}: max |diff| vs one process {results}")
        assert results.pop("odd_tokens_error").startswith("9 tokens (latents (1, 4, 1, 6, 6)) are not divisible by "
                                                          "the sequence-parallel size 2")
        assert "attention_layout='full', got 'factorized'" in results.pop("factorized_error")
        assert results.keys() == {"attention", "forward", "grad"}
        assert all(value < 1e-5 for value in results.values()), results


def relative_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def step_seconds(out: Path) -> list[float]:
    """Wall time per step from the metrics log (samples / samples_per_s, one step per log line)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [round(2 / row["samples_per_s"], 4) for row in rows if row.get("samples_per_s")]


@pytest.fixture(scope="module")
def one_process(workdir):
    """One process, batch 2, no accumulation: the global batch of one sequence-parallel group."""
    root, manifest = workdir
    return train(1, root / "sp_single", manifest, str(root / "rank_dump.py"))


def test_sequence_parallel_training_matches_one_process(workdir, one_process):
    """2 ranks, P = 2 (one data-parallel group): both read the single process's batch, each runs half the
    tokens; after STEPS updates the weights equal the single process's."""
    root, manifest = workdir
    single = one_process
    sp = train(2, root / "sp2", manifest, str(root / "rank_dump.py"), "distributed.backend=ddp",
               "distributed.sequence_parallel_size=2", "train.validate_every=2",
               'train.validation_prompts=["a red square"]')  # rank 0 samples alone, without the hook
    assert (sp / "samples" / "step-2").is_dir()
    rank0, rank1 = weights(sp / "rank0.safetensors"), weights(sp / "rank1.safetensors")
    assert_close(rank0, rank1, 0.0, "sequence-parallel rank 0 vs rank 1")
    reference = weights(single / "rank0.safetensors")
    worst = relative_diff(rank0, reference)
    print(f"P=2 vs one process: max relative diff {worst:.3g}")
    assert worst <= 1e-5
    for group in ("model", "optimizer", "ema"):
        assert relative_diff(checkpoint(sp, STEPS, group), checkpoint(single, STEPS, group)) <= 1e-5, group
    # The run trained, with the single process's losses and (unclipped) gradient norms: Adam and clipping
    # hide a gradient scale error in the weights, the norm does not.
    assert any(not torch.equal(checkpoint(sp, 2, "model")[k], rank0[k]) for k in rank0)
    for key in ("loss", "grad_norm"):
        values = [[row[key] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in row]
                  for out in (sp, single)]
        print(f"{key}: P=2 {values[0]} one process {values[1]}")
        assert len(values[0]) == STEPS and values[0] == pytest.approx(values[1], rel=1e-5), key
    print("step seconds, P=2:", step_seconds(sp), "one process:", step_seconds(single))

    # Checkpoints are topology-free: the single process's step-2 checkpoint resumed with P = 2.
    resumed = train(2, root / "sp_resumed", manifest, str(root / "rank_dump.py"), "distributed.backend=ddp",
                    "distributed.sequence_parallel_size=2", f"resume={single / 'checkpoints' / 'step-2'}")
    for group in ("model", "optimizer", "ema"):
        assert relative_diff(checkpoint(resumed, STEPS, group), checkpoint(single, STEPS, group)) <= 1e-5, group



def test_sequence_parallel_with_zero2_matches_one_process(workdir, one_process):
    root, manifest = workdir
    out = train(2, root / "sp_zero2", manifest, str(root / "rank_dump.py"), "distributed.backend=deepspeed",
                "distributed.zero_stage=2", "distributed.deepspeed_config=configs/deepspeed/zero2.json",
                "distributed.sequence_parallel_size=2")
    assert_close(weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors"), 0.0, "sp zero2 ranks")
    for group in ("model", "optimizer", "ema"):
        worst = relative_diff(checkpoint(out, STEPS, group), checkpoint(one_process, STEPS, group))
        print(f"P=2 ZeRO-2 vs one process, {group}: max relative diff {worst:.3g}")
        assert worst <= 1e-5, group



def test_sequence_parallel_with_two_data_parallel_groups(workdir, reference):
    """4 ranks, P = 2: two sequence-parallel groups, each a data-parallel rank reading its own shard, so the
    run equals the 2-process DDP run and one process with 2 accumulation steps (`reference`)."""
    root, manifest = workdir
    out = train(4, root / "sp2_dp2", manifest, str(root / "rank_dump.py"), "distributed.backend=ddp",
                "distributed.sequence_parallel_size=2")
    ranks = [weights(out / f"rank{rank}.safetensors") for rank in range(4)]
    for rank in range(1, 4):
        assert_close(ranks[rank], ranks[0], 0.0, f"P=2 x dp=2 rank {rank} vs rank 0")
    for group in ("model", "optimizer", "ema"):
        worst = relative_diff(checkpoint(out, STEPS, group), checkpoint(reference, STEPS, group))
        print(f"P=2 x dp=2 vs one process (2 accumulation steps), {group}: max relative diff {worst:.3g}")
        assert worst <= 1e-5, group

# ----------------------------------------------------------------------------------------------------
# Cluster check and a 2-node launch (two torchrun agents on loopback)
# ----------------------------------------------------------------------------------------------------


def two_nodes(args_node0: list[str], args_node1: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Two `torchrun --nnodes 2` agents, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    procs = []
    for node_rank, args in enumerate((args_node0, args_node1)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", f"test{port}", *args]
        print("launch:", " ".join(cmd))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def test_check_cluster_passes_on_a_good_launch():
    done = run(torchrun(2) + ["scripts/check_cluster.py", "--config", DEBUG, "train.max_steps=7"], timeout=120)
    print(done.stdout)
    assert "cluster ok: 2 ranks" in done.stdout and "all-reduce" in done.stdout
    assert "rank 1:" in done.stdout and "0 GPU(s) cpu" in done.stdout


def test_check_cluster_names_a_config_mismatch():
    check = ["scripts/check_cluster.py", "--config", DEBUG]
    tic = time.perf_counter()
    nodes = two_nodes(check + ["train.lr=0.001"], check + ["train.lr=0.002"], timeout=120)
    seconds = time.perf_counter() - tic
    errors = "".join(node.stderr for node in nodes)
    print(f"mismatch reported in {seconds:.1f} s:", [line for line in errors.splitlines() if "FAILED" in line][:2])
    assert all(node.returncode != 0 for node in nodes)
    assert "config hash mismatch" in errors and "ranks [0]" in errors and "ranks [1]" in errors
    assert seconds < 90


def test_two_node_ddp_run_matches_one_process(workdir, reference):
    root, manifest = workdir
    out = root / "two_nodes"
    train_args = ["scripts/train.py", "--config", DEBUG, f"data.manifest={manifest}", f"output_dir={out}",
                  f"train.max_steps={STEPS}", "train.ckpt_every=2", "distributed.backend=ddp"]
    nodes = two_nodes(train_args, train_args)
    for node in nodes:
        assert node.returncode == 0, node.stderr[-4000:]
    assert_close(checkpoint(out, STEPS, "model"), checkpoint(reference, STEPS, "model"), 1e-5, "2 nodes vs 1x2x2")

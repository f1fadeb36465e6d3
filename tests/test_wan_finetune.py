"""Fine-tuning a converted Wan 2.1 transformer under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo).

A tiny random `WanTransformer3DModel` (diffusers' test config, with the debug VAE's 4 latent channels and the
tiny text encoder's width 16) is converted to a VideoDiT folder (t2v.models.wan) and trained with the debug
config: full fine-tune and LoRA, each under ZeRO-2 and ZeRO-3, each straight for 4 steps and again stopped at
the step-2 checkpoint and resumed. A resumed run must equal the straight one bit for bit: losses, fp32 masters,
AdamW moments, EMA. All eight runs share one `torchrun` launch (DeepSpeed's import costs seconds per launch).
"""

import json
from pathlib import Path

import pytest
import torch
from test_distributed import DEBUG, checkpoint, run, torchrun

STEPS = 4
# diffusers' WanTransformer3DModel test config, with in_channels and text_dim of the debug VAE and text encoder.
TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)  # fmt: skip
# VideoDiT's attention projections (t2v/models/dit.py): fused self-attention QKV, cross-attention KV, outputs.
LORA = ("model.lora_rank=4", "model.lora_target_modules=[to_qkv,to_kv,to_out]")
ZERO = {
    2: ("distributed.backend=deepspeed", "distributed.zero_stage=2",
        "distributed.deepspeed_config=configs/deepspeed/zero2.json"),
    3: ("distributed.backend=deepspeed", "distributed.zero_stage=3",
        "distributed.deepspeed_config=configs/deepspeed/zero3.json"),
}  # fmt: skip
CASES = {f"zero{stage}_{kind}": [*ZERO[stage], *extra] for stage in ZERO for kind, extra in (("full", ()), ("lora", LORA))}

# Every case straight to STEPS (a checkpoint at step 2), then resumed from that checkpoint, in one launch.
RUNS = """
import json, sys
from t2v.config import load_config
from t2v.parallel.distributed import init_distributed
from t2v.train import trainer
from t2v.train.dit_task import DiTTask
root, common, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
init_distributed()
for name, overrides in cases.items():
    for kind, extra in (("straight", []), ("resumed", [f"resume={root}/{name}/straight/checkpoints/step-2"])):
        cfg = load_config(common[0], [*common[1:], f"output_dir={root}/{name}/{kind}", *overrides, *extra])
        trainer.train(cfg, DiTTask(cfg))
"""


def converted_wan(folder: Path) -> Path:
    """A tiny random Wan 2.1 transformer, converted to a VideoDiT folder."""
    from diffusers import WanTransformer3DModel

    from t2v.models.wan import transformer_from_wan

    torch.manual_seed(0)
    wan = WanTransformer3DModel(**TINY_WAN)
    with torch.no_grad():
        for p in wan.parameters():  # every tensor random (the zero-initialised ones too), as tests/test_wan.py
            p.add_(torch.randn_like(p) * 0.1)
    transformer_from_wan(wan).save_pretrained(folder)
    return folder


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from t2v.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("wan_finetune")
    manifest = write_dataset(root / "clips", num=8, seed=0)
    model = converted_wan(root / "wan_videodit")
    (root / "runs.py").write_text(RUNS)
    common = [DEBUG, f"model.dit={model}", f"data.manifest={manifest}", f"train.max_steps={STEPS}",
              "train.ckpt_every=2", "train.log_every=1"]
    run(torchrun(2) + [str(root / "runs.py"), str(root), json.dumps(common), json.dumps(CASES)], timeout=900)
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_converted_wan_fine_tunes_and_resumes_exactly(runs, case):
    straight, resumed = runs / case / "straight", runs / case / "resumed"
    assert losses(resumed) == {step: losses(straight)[step] for step in (3, 4)}, "losses after the resume"
    for group in ("model", "optimizer", "ema"):
        a, b = checkpoint(straight, STEPS, group), checkpoint(resumed, STEPS, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{case}: {group} differs"
    # It trained: the trained weights moved between step 2 and step 4, and only they did.
    start, end = checkpoint(straight, 2, "model"), checkpoint(straight, STEPS, "model")
    moved = {k for k in end if not torch.equal(start[k], end[k])}
    trained = set(checkpoint(straight, STEPS, "ema"))
    assert moved and moved <= trained, case
    if case.endswith("lora"):
        assert trained and all("lora_" in k for k in trained), case
        assert any(".to_qkv." in k for k in trained) and any(".to_kv." in k for k in trained)
    else:
        assert trained == set(end), case  # full fine-tune: every tensor of the model
    assert (straight / "pipeline" / "transformer").is_dir()  # exported with the gathered (EMA) weights


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_zero2_and_zero3_fine_tune_alike(runs, kind):
    """The same fine-tune under ZeRO-2 and ZeRO-3 ends with the same weights (up to float summation order)."""
    for group in ("model", "optimizer", "ema"):
        a, b = checkpoint(runs / f"zero2_{kind}" / "straight", STEPS, group), \
            checkpoint(runs / f"zero3_{kind}" / "straight", STEPS, group)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-5, f"{kind} {group}: max |diff| {worst}"

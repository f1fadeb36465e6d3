"""Fault injection: processes killed with SIGKILL in the middle of checkpoint writes, then resumed."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2v.config import load_config
from t2v.data.shapes import write_dataset
from t2v.train import checkpoint as ckpt
from t2v.train.dit_task import train_dit

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "train" / "debug.yaml")
STEPS = 24
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the test process's thread count (conftest): same numerics


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("data"), num=6, seed=0))


def _overrides(manifest, out):
    # a checkpoint every step, so a kill at a random moment is likely to land inside a write
    return [f"data.manifest={manifest}", f"output_dir={out}", f"train.max_steps={STEPS}", "train.ckpt_every=1",
            "train.keep_last=2", "train.log_every=1"]


def test_sigkill_during_checkpoint_writes_then_resume_is_bit_exact(tmp_path, manifest):
    straight = tmp_path / "straight"
    train_dit(load_config(DEBUG, _overrides(manifest, straight)))

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    cmd = [sys.executable, "scripts/train.py", "--config", DEBUG, *_overrides(manifest, killed)]
    for attempt in range(3):
        process = subprocess.Popen(cmd + (["resume=latest"] if attempt else []), cwd=ROOT, env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait for training to be under way (a checkpoint past the last one), then kill at a random moment
        before = len(ckpt.list_checkpoints(str(killed / "checkpoints")))
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            steps = [s for s, _ in ckpt.list_checkpoints(str(killed / "checkpoints"))]
            if steps and (len(steps) > before or max(steps) > 2 * (attempt + 1)):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            break  # finished before the kill: nothing more to inject
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        # every finished step-N folder is intact; leftovers may exist and are cleaned by the next save
        for _, path in ckpt.list_checkpoints(str(killed / "checkpoints")):
            assert ckpt.checkpoint_damage(path) is None, path
    assert kills >= 1
    result = subprocess.run(cmd + ["resume=latest"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    for group in ("model", "ema", "optimizer"):
        a = load_file(str(straight / "checkpoints" / f"step-{STEPS}" / f"{group}.safetensors"))
        b = load_file(str(killed / "checkpoints" / f"step-{STEPS}" / f"{group}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    leftovers = [p.name for p in (killed / "checkpoints").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers

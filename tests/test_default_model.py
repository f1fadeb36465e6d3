"""The shipped default model loads offline and makes a Shapes World video; the README's command works."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import t2v
from pipelines import T2VPipeline


def test_default_model_makes_a_17x64x64_video():
    pipe = T2VPipeline.from_pretrained(t2v.DEFAULT_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.text_encoder_source == "minilm"  # the pip-installed encoder, not a copy
    frames = pipe("a large blue square moving up on a white background", num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 17, 64, 64, 3)
    assert np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1


def test_shipped_weights_are_half_precision_safetensors():
    files = list(Path(t2v.DEFAULT_MODEL).rglob("*"))
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in files if f.is_file()) < 60 * 2**20
    from safetensors import safe_open

    for f in weights:
        with safe_open(str(f), "pt") as sf:
            assert all(sf.get_slice(k).get_dtype() == "F16" for k in sf.keys())


def test_readme_generate_command(tmp_path):
    readme = Path("README.md").read_text()
    command = re.search(r"```bash\n(pip install [^\n]*generate\.py[^\n]*)\n```", readme).group(1)
    generate = shlex.split(command.split("&&", 1)[1])
    assert generate[:2] == ["python", "generate.py"]
    r = subprocess.run([sys.executable, *generate[1:], "--out-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "00000.mp4").stat().st_size > 0
    assert (tmp_path / "manifest.jsonl").exists()


def test_quick_eval_script_reads_back_every_category(tmp_path):
    """quick_eval_shapes.py on the shipped model (2 steps: the figures mean nothing, the plumbing runs)."""
    out = tmp_path / "quick.json"
    cmd = [sys.executable, "examples/shapes_world/scripts/quick_eval_shapes.py", "--model", t2v.DEFAULT_MODEL, "--per-category", "1",
           "--steps", "2", "--guidance", "1", "5", "--batch-size", "3", "--device", "cpu", "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True)
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and set(result) >= {"guidance_1", "guidance_5"}
    for guidance in ("guidance_1", "guidance_5"):
        assert result[guidance]["steps_computed"] == result[guidance]["steps_total"]  # no cache: every step runs
        scores = {key: value for key, value in result[guidance].items()
                  if key not in ("seconds", "steps_total", "steps_computed")}
        assert set(scores) == {"seen", "heldout", "paraphrase", "two_object"}
        for accuracy in scores.values():
            assert set(accuracy) == {"background", "colour", "shape", "size", "motion", "all"}
            assert all(0.0 <= value <= 1.0 for value in accuracy.values())

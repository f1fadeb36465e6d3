"""Memory presets and first-block step caching on a tiny pipeline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig
from helpers import tiny_pipeline

from t2v.pipelines.memory import MEMORY_PRESETS, apply_memory_preset

STEPS = 4


def _frames(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle", "a blue square"], generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
               num_inference_steps=STEPS)
    return out.frames


@pytest.fixture(scope="module")
def reference():
    return _frames(tiny_pipeline())


@pytest.mark.parametrize("name", list(MEMORY_PRESETS))
def test_each_preset_runs_and_changes_only_the_precision_it_states(name, reference):
    pipe = tiny_pipeline()
    apply_memory_preset(pipe, name, "cpu")
    frames = _frames(pipe)
    assert frames.shape == reference.shape
    if MEMORY_PRESETS[name].fp8_transformer:
        # Every transformer weight rounded to float8 e4m3 (3 mantissa bits): frames in [0, 1] move by at most 0.05.
        assert np.abs(frames - reference).max() < 0.05
    elif MEMORY_PRESETS[name].vae_tiling:
        # Slicing decodes one sample at a time: the batch-1 convolutions round differently in the last float32
        # bits. (Tiling engages only above 256 px, larger than these frames.)
        np.testing.assert_allclose(frames, reference, rtol=0, atol=1e-5)
    else:
        np.testing.assert_array_equal(frames, reference)


def test_fp8_preset_stores_transformer_layers_in_float8():
    pipe = tiny_pipeline()
    apply_memory_preset(pipe, "low", "cpu")
    assert pipe.transformer.blocks[0].mlp[0].weight.dtype == torch.float8_e4m3fn
    assert pipe.transformer.dtype == torch.float32  # the compute dtype, which the pipeline casts its inputs to
    assert pipe.vae.use_tiling and pipe.vae.use_slicing


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="memory preset 'tiny' is unknown"):
        apply_memory_preset(tiny_pipeline(), "tiny", "cpu")


def _computed_steps(pipe) -> list[int]:
    """A counter of the transformer's last-block runs (a cached step skips every block after the first)."""
    count = [0]
    pipe.transformer.blocks[-1].mlp.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_cache_threshold_zero_is_no_cache(reference):
    pipe = tiny_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    count = _computed_steps(pipe)
    np.testing.assert_array_equal(_frames(pipe), reference)
    assert count[0] == STEPS


def test_large_cache_threshold_skips_steps_and_resets_between_calls(reference):
    pipe = tiny_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    count = _computed_steps(pipe)
    first = _frames(pipe)
    assert count[0] == 1  # the first step computes; every later one reuses its residual
    assert not np.array_equal(first, reference)
    # The pipeline resets the cache at the end of a call: the next call starts afresh and repeats the first.
    np.testing.assert_array_equal(_frames(pipe), first)
    assert count[0] == 2
    pipe.transformer.disable_cache()
    np.testing.assert_array_equal(_frames(pipe), reference)


def _generate(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_generate_takes_a_memory_preset_and_a_cache_threshold(tmp_path):
    model = tmp_path / "tiny"
    tiny_pipeline().save_pretrained(model)
    r = _generate("a red circle", "--model", model, "--out-dir", tmp_path / "out", "--steps", 3,
                  "--memory", "low", "--cache", "0.1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "00000.mp4").is_file()
    r = _generate("a red circle", "--model", model, "--out-dir", tmp_path / "bad", "--cache", "-1")
    assert r.returncode == 2 and "--cache -1.0 must be a threshold of at least 0" in r.stderr
    r = _generate("a red circle", "--model", model, "--out-dir", tmp_path / "bad", "--memory", "tiny")
    assert r.returncode == 2 and "invalid choice: 'tiny'" in r.stderr


def test_quick_eval_counts_the_steps_each_cache_threshold_computes(tmp_path):
    model = tmp_path / "tiny"
    tiny_pipeline().save_pretrained(model)
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "examples/shapes_world/scripts/quick_eval_shapes.py", "--model", str(model),
                        "--per-category", "1", "--steps", "3", "--cache", "none", "0", "1e9", "--device", "cpu",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    computed = {key: result[key]["steps_computed"] for key in result if "_cache_" in key}
    assert computed == {"guidance_3_cache_none": 3, "guidance_3_cache_0": 3, "guidance_3_cache_1e+09": 1}
    assert result["guidance_3_cache_0"]["seen"] == result["guidance_3_cache_none"]["seen"]

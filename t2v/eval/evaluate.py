"""Does the generated video show what the prompt says? Evaluation in two stages, each a folder in, a folder out.

generate: one video per prompt with seed ``seed + i`` into ``OUT/videos`` (videos + manifest.jsonl).
  Prompts: ``.txt`` (one per line) or ``.jsonl`` rows ``{"prompt", "category"?, "record"?}``.
score: reads a video folder (``manifest.jsonl`` rows with "prompt" or "caption" and "path", or a
  dataset's ``manifest.csv``); a video-text scorer (``clip:PATH``, ``xclip:PATH``, ``retriever:PATH``)
  scores every video against every prompt. Writes ``OUT/metrics.json`` (retrieval R@K/MedR/MnR both
  ways, plain and dual-softmax, matched cosine, R-precision, temporal metrics, Shapes World attribute
  accuracy when rows carry records, per category), ``OUT/per_video.jsonl`` and ``OUT/report.html``.
  A reference folder (real videos + captions) gets the same metrics, an upper bound, and the Frechet
  distance between generated and real scorer video features.

`scripts/evaluate.py` is the command line over `generate_stage` and `score_stage`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from t2v.data.manifest import load_manifest
from t2v.eval.frechet import frechet_distance
from t2v.eval.report import video_gif_base64, write_report
from t2v.eval.retrieval import retrieval_metrics, retrieval_ranks, same_prompt_matches, summarize_ranks
from t2v.eval.scorers import load_scorer
from t2v.eval.shapes_readback import read_back, score
from t2v.eval.similarity import r_precision
from t2v.eval.temporal import dynamic_degree, motion_smoothness, temporal_flicker
from t2v.generation import GenerationSettings, generate_to_folder, read_prompt_file
from t2v.pipelines.loading import load_pipeline


# --------------------------------------------------------------------------------------------- inputs
def _parse_json(text: str, where: str):
    """``json.loads(text)``, or ``ValueError`` naming ``where`` (file and line) and the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err.msg}): {text.strip()[:80]!r}") from None


def read_prompts(path: str) -> list[dict]:
    """Rows ``{"prompt", ...}`` from a .txt (one prompt per line) or .jsonl file."""
    if not path.endswith(".jsonl"):
        return [{"prompt": prompt} for prompt in read_prompt_file(path)]
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = _parse_json(line, f"{path} line {number}")
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ValueError(f"{path} line {number}: needs a non-empty string 'prompt', got {line.strip()[:80]!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return rows


def read_folder(folder: str) -> list[dict]:
    """Rows ``{"prompt", "path" (absolute), "record" (dict or None), "category" (or None)}`` of a folder."""
    jsonl, csv_path = os.path.join(folder, "manifest.jsonl"), os.path.join(folder, "manifest.csv")
    if os.path.isfile(jsonl):
        with open(jsonl, encoding="utf-8") as f:
            raw = [_parse_json(line, f"{jsonl} line {number}") for number, line in enumerate(f, start=1)
                   if line.strip()]
    elif os.path.isfile(csv_path):
        raw = load_manifest(csv_path)
    else:
        raise ValueError(f"video folder {folder!r} has no manifest.jsonl or manifest.csv")
    if not raw:
        raise ValueError(f"video folder {folder!r} has an empty manifest")
    rows = []
    for number, row in enumerate(raw, start=1):
        text = row.get("prompt", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(text, str) or "path" not in row:
            raise ValueError(f"{folder} manifest row {number} needs 'path' and a 'prompt' or 'caption' string")
        record = row.get("record")
        if isinstance(record, str):
            record = _parse_json(record, f"{folder} manifest row {number} 'record'") if record.strip() else None
        rows.append({"prompt": text, "path": os.path.join(folder, row["path"]), "record": record,
                     "category": row.get("category"), "content": row.get("canonical_caption") or text})
    return rows


def read_video(path: str) -> np.ndarray:
    """All frames of an mp4/gif/... as uint8 (T, H, W, 3)."""
    if path.lower().endswith(".gif"):
        from PIL import Image, ImageSequence

        with Image.open(path) as image:
            frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    else:
        import av

        with av.open(path) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"video {path!r} has no frames")
    return np.stack(frames)


# --------------------------------------------------------------------------------------------- generate
def generate_stage(
    model: str,
    prompts_path: str,
    out: str,
    settings: GenerationSettings,
    *,
    seed: int = 0,
    shift: float | None = None,
    solver: str | None = None,
    cache: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    distributed: bool = False,
) -> str:
    """One video per prompt of `prompts_path` (prompt i with seed `seed + i`) into ``out/videos``; returns that
    folder. `shift`/`solver` replace the model's sampler; `cache` is a first-block-cache threshold (None: off);
    `dtype` defaults to float32 on CPU, bfloat16 on CUDA. `distributed`: every rank of the initialized process
    group calls this and samples its share of the batches (`t2v.generation.generate_to_folder`); "cuda" is each
    rank's current device."""
    pipe = load_pipeline(model, device, dtype, shift, solver, cache=cache)
    return generate_prompts(pipe, prompts_path, out, settings, seed=seed, overwrite=overwrite,
                            distributed=distributed, recorded={"flow_shift": shift, "solver": solver,
                                                               "cache_threshold": cache})


def generate_prompts(pipe, prompts_path: str, out: str, settings: GenerationSettings, *, seed: int = 0,
                     overwrite: bool = False, distributed: bool = False, recorded: dict | None = None) -> str:
    """`generate_stage` with a loaded pipeline: one video per prompt into ``out/videos``, each manifest row
    keeping the prompt's category and record and the `recorded` settings that are not None."""
    rows = read_prompts(prompts_path)
    set_values = {key: value for key, value in (recorded or {}).items() if value is not None}
    extra = [{**{key: row[key] for key in ("category", "record") if key in row}, **set_values} for row in rows]
    videos_dir = os.path.join(out, "videos")
    seeds = [seed + i for i in range(len(rows))]
    generate_to_folder(pipe, [row["prompt"] for row in rows], videos_dir, seeds, settings, extra=extra,
                       overwrite=overwrite, distributed=distributed)
    return videos_dir


# --------------------------------------------------------------------------------------------- score
def score_set(scorer, rows: list[dict], *, shape_rule: str = "template", dynamic_threshold: float = 10.0,
              num_gifs: int = 0, chunk: int = 32) -> dict:
    """Similarity matrix, scorer features and per-video metrics of a folder, reading ``chunk`` videos at a time.

    `shape_rule`: Shapes World shape read-back, "template" or "fill"; `dynamic_threshold`: the motion magnitude
    (top-5% frame difference, 0-255) above which a video moves; `num_gifs`: the first videos kept as GIFs.
    """
    prompts = [row["prompt"] for row in rows]
    # A joint-space scorer encodes the prompts once and each video once (its features, normalised, are its
    # embedding); X-CLIP conditions every text on the video, so it scores each chunk with all prompts.
    joint = not getattr(scorer, "conditions_texts_on_videos", False)
    text_emb = scorer.encode_texts(prompts).float() if joint else None  # (M, D)
    sims, feats, flicker, smooth, moving, shapes, gifs = [], [], [], [], [], [], []
    first = None
    for start in range(0, len(rows), chunk):
        batch = rows[start : start + chunk]
        videos = [read_video(row["path"]) for row in batch]
        for row, video in zip(batch, videos):  # one clip shape per set: metrics over mixed shapes mislead
            size = "x".join(map(str, video.shape[:3]))
            first = first or (rows[0]["path"], size)
            if size != first[1]:
                raise ValueError(f"video {row['path']!r} is {size} (frames x height x width) but {first[0]!r} is "
                                 f"{first[1]}: score videos of one size at a time")
        features = scorer.video_features(videos).float()  # (n, D)
        if joint:
            sims.append(text_emb @ torch.nn.functional.normalize(features, dim=-1).T)  # (M, n)
        else:
            sims.append(scorer.similarity(prompts, videos))  # (M, n)
        feats.append(features)
        flicker.append(temporal_flicker(videos, per_video=True))
        if min(len(v) for v in videos) >= 3:
            smooth.append(motion_smoothness(videos, per_video=True))
        else:  # undefined for 2-frame videos
            smooth.append(np.full(len(videos), np.nan))
        moving.append(dynamic_degree(videos, dynamic_threshold, per_video=True))
        shapes += [score(read_back(v, shape_rule), row["record"]) if row["record"] else None
                   for v, row in zip(videos, batch)]
        gifs += [video_gif_base64(v) for v in videos[: max(0, num_gifs - start)]]
        print(f"scored {min(start + chunk, len(rows))}/{len(rows)} videos", flush=True)
    return {
        "sim": torch.cat(sims, dim=1).numpy(),  # (M, N)
        "features": torch.cat(feats).float().numpy(),  # (N, D)
        "flicker": np.concatenate(flicker), "smoothness": np.concatenate(smooth),
        "moving": np.concatenate(moving), "shapes": shapes, "gifs": gifs,
    }


def _shapes_accuracy(results: list[dict | None]) -> dict:
    scored = [r for r in results if r is not None]
    if not scored:
        return {}
    rates = {attribute: float(np.mean([r[attribute] for r in scored])) for attribute in scored[0]}
    return {"shapes": {**rates, "num_videos": len(scored)}}


def summarize(result: dict, rows: list[dict], *, r_precision_distractors: int = 99) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics dict of a scored set, plus its text-to-video and video-to-text ranks. R-precision uses
    `r_precision_distractors` (fewer when there are fewer other prompts)."""
    sim = result["sim"]
    n = sim.shape[0]
    # a repeated prompt (common among a dataset's canonical captions) matches the videos of all its copies, and
    # so do other wordings of the same content (a Shapes World data set's canonical_caption column)
    match = same_prompt_matches([row.get("content") or row["prompt"] for row in rows])  # (n, n)
    t2v_ranks, v2t_ranks = retrieval_ranks(sim, match)
    matched = np.diag(sim)
    metrics = {"num_videos": n, **retrieval_metrics(sim, match, dual_softmax=True),
               "matched_cosine": float(matched.mean())}
    if n >= 2:
        k = min(r_precision_distractors, n - 1)
        metrics[f"r_precision@{k + 1}"] = r_precision(sim, num_distractors=k, seed=0)
    metrics["temporal_flicker"] = float(result["flicker"].mean())
    if np.isfinite(result["smoothness"]).all():
        metrics["motion_smoothness"] = float(result["smoothness"].mean())
    metrics["dynamic_degree"] = float(result["moving"].mean())
    metrics.update(_shapes_accuracy(result["shapes"]))

    categories = sorted({row["category"] for row in rows if row["category"] is not None})
    if categories:
        metrics["per_category"] = {}
        for category in categories:
            index = np.array([i for i, row in enumerate(rows) if row["category"] == category])
            # queries of this category against the full gallery, so numbers compare across categories
            metrics["per_category"][category] = {
                "num_videos": len(index),
                **summarize_ranks(t2v_ranks[index], "t2v"),
                **summarize_ranks(v2t_ranks[index], "v2t"),
                "matched_cosine": float(matched[index].mean()),
                **_shapes_accuracy([result["shapes"][i] for i in index]),
            }
    return metrics, t2v_ranks, v2t_ranks


def score_stage(
    videos_dir: str,
    out: str,
    scorer_spec: str,
    *,
    reference: str | None = None,
    device: str | None = None,
    shape_rule: str = "template",
    dynamic_threshold: float = 10.0,
    r_precision_distractors: int = 99,
    report_videos: int = 64,
) -> dict:
    """Score the folder `videos_dir` (and `reference`, if given) with the scorer `scorer_spec`
    (``clip:PATH``, ``xclip:PATH`` or ``retriever:PATH``); writes metrics.json, per_video.jsonl and report.html
    (showing `report_videos` videos) into `out` and returns the metrics."""
    rows = read_folder(videos_dir)
    scorer = load_scorer(scorer_spec, device=device)
    options = {"shape_rule": shape_rule, "dynamic_threshold": dynamic_threshold}
    result = score_set(scorer, rows, num_gifs=report_videos, **options)
    generated, t2v_ranks, v2t_ranks = summarize(result, rows, r_precision_distractors=r_precision_distractors)
    metrics = {"scorer": scorer_spec, "shape_rule": shape_rule, "videos": os.path.abspath(videos_dir),
               "generated": generated}
    if reference:
        ref_rows = read_folder(reference)
        ref = score_set(scorer, ref_rows, **options)
        metrics["reference"], _, _ = summarize(ref, ref_rows, r_precision_distractors=r_precision_distractors)
        metrics["reference"]["path"] = os.path.abspath(reference)
        if len(rows) >= 2 and len(ref_rows) >= 2:
            metrics["frechet_distance"] = frechet_distance(result["features"], ref["features"])
    _write_outputs(out, metrics, rows, result, t2v_ranks, v2t_ranks,
                   title=f"t2v evaluation: {os.path.basename(os.path.abspath(videos_dir))}")
    return metrics


def _write_outputs(out: str, metrics: dict, rows: list[dict], result: dict, t2v_ranks: np.ndarray,
                   v2t_ranks: np.ndarray, title: str) -> None:
    # 1. every output goes to a temporary name first; metrics.json is renamed into place last, so a failed
    # run never leaves a half-written file or a metrics.json beside another run's report
    os.makedirs(out, exist_ok=True)
    per_video = "".join(
        json.dumps({
            "prompt": row["prompt"], "path": row["path"], "category": row["category"],
            "t2v_rank": float(t2v_ranks[i]), "v2t_rank": float(v2t_ranks[i]),
            "matched_cosine": float(result["sim"][i, i]), "temporal_flicker": float(result["flicker"][i]),
            "shapes": result["shapes"][i],
        }) + "\n"
        for i, row in enumerate(rows)
    )
    cards = [
        {"gif": gif, "prompt": rows[i]["prompt"], "rank": float(t2v_ranks[i]),
         "scores": {"cosine": float(result["sim"][i, i]),
                    **({"shapes all": result["shapes"][i]["all"]} if result["shapes"][i] else {})}}
        for i, gif in enumerate(result["gifs"])
    ]
    tmp = {name: os.path.join(out, f".tmp-{name}") for name in ("per_video.jsonl", "report.html", "metrics.json")}
    with open(tmp["per_video.jsonl"], "w") as f:
        f.write(per_video)
    write_report(tmp["report.html"], metrics, cards, result["sim"], t2v_ranks, title=title)
    with open(tmp["metrics.json"], "w") as f:
        json.dump(metrics, f, indent=2)
    # 2. rename into place, metrics.json last
    for name, path in tmp.items():
        os.replace(path, os.path.join(out, name))

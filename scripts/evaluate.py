"""Does the generated video show what the prompt says? Generate videos for fixed prompts, then score them.

    python scripts/evaluate.py --prompts prompts.jsonl --model runs/x/pipeline --out eval/x --scorer clip:PATH
    python scripts/evaluate.py --stage score --videos eval/x/videos --out eval/x --scorer xclip:PATH \\
        --reference data/shapes_val
    torchrun --nproc_per_node 4 scripts/evaluate.py --prompts prompts.jsonl --model runs/x/pipeline --out eval/x \\
        --scorer clip:PATH

generate writes one video per prompt (seed ``--seed + i``) into ``OUT/videos``; score writes ``OUT/metrics.json``,
``OUT/per_video.jsonl`` and ``OUT/report.html``. The stages, their inputs and their metrics:
`t2v/eval/evaluate.py`. Under torchrun the generate stage splits the batches over the processes (the videos
and manifest are those of one process) and rank 0 scores.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from t2v.eval.evaluate import generate_stage, read_prompts, score_stage
from t2v.eval.scorers import parse_scorer_spec
from t2v.generation import GenerationSettings, guidance_error, out_dir_error, sampler_error, seed_error
from t2v.parallel.distributed import init_distributed

STAGES = ("generate", "score", "all")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, no usage dump; under torchrun rank 0 says it, once
        self.exit(2, f"evaluate.py: error: {message}\n" if os.environ.get("RANK", "0") == "0" else None)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Generate videos for fixed prompts and score them by video-text retrieval.")
    p.add_argument("--stage", choices=STAGES, default="all")
    p.add_argument("--out", required=True, help="output folder (videos/, metrics.json, report.html)")
    p.add_argument("--prompts", help="generate: .txt (one prompt per line) or .jsonl with 'prompt'")
    p.add_argument("--model", help="generate: pipeline folder")
    p.add_argument("--videos", help="score: folder with manifest.jsonl (default: OUT/videos)")
    p.add_argument("--scorer", help="score: clip:PATH | xclip:PATH | retriever:PATH")
    p.add_argument("--reference", help="score: folder of real videos with manifest.jsonl or manifest.csv")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--shift", type=float, default=None, help="fixed flow shift (default: the model's scheduler)")
    p.add_argument("--solver", choices=["euler", "unipc"], default=None, help="sampler (default: the model's)")
    p.add_argument("--cache", type=float, default=None, metavar="THRESHOLD",
                   help="first-block step cache threshold, as generate.py --cache (default: off)")
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--format", choices=["mp4", "gif"], default="mp4")
    p.add_argument("--overwrite", action="store_true",
                   help="generate: write into an OUT/videos that holds files (replaces videos and manifest only)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="generator dtype (default: float32 on CPU, bfloat16 on CUDA); scorers run in float32")
    p.add_argument("--shape-rule", choices=["template", "fill"], default="template",
                   help="score: Shapes World shape read-back, template (best soft template) or fill (box fill)")
    p.add_argument("--dynamic-threshold", type=float, default=10.0,
                   help="dynamic degree: motion magnitude (top-5%% frame difference, 0-255) above which a video moves")
    p.add_argument("--r-precision-distractors", type=int, default=99,
                   help="R-precision distractors (fewer when there are fewer other prompts)")
    p.add_argument("--report-videos", type=int, default=64, help="videos shown in report.html")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage in ("generate", "all"):
        for name in ("prompts", "model"):
            if getattr(args, name) is None:
                parser.error(f"--stage {args.stage} needs --{name}")
        if not os.path.isfile(os.path.join(args.model, "model_index.json")):
            parser.error(f"--model {args.model!r} has no model_index.json (not a pipeline folder)")
        try:
            count = len(read_prompts(args.prompts))
        except ValueError as e:
            parser.error(str(e))
        for error in (guidance_error(args.guidance), seed_error(args.seed, count)):
            if error is not None:
                parser.error(f"--{error}")
        if (error := out_dir_error(os.path.join(args.out, "videos"), args.overwrite)) is not None:
            parser.error(f"--out: {error}")
    if args.stage in ("score", "all"):
        if args.scorer is None:
            parser.error(f"--stage {args.stage} needs --scorer clip:PATH | xclip:PATH | retriever:PATH")
        try:
            kind, path = parse_scorer_spec(args.scorer)
        except ValueError as e:
            parser.error(str(e))
        # Checked before any generation: a local path must exist (a hub id is left to the loader).
        if (kind == "retriever" or path.startswith(("/", ".", "~"))) and not os.path.isdir(os.path.expanduser(path)):
            parser.error(f"--scorer {args.scorer!r}: {path!r} is not a folder")
        if args.reference is not None and not os.path.isdir(args.reference):
            parser.error(f"--reference {args.reference!r} is not a folder")
    for name in ("steps", "num_frames", "height", "width", "batch_size", "r_precision_distractors"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value} must be at least 1")
    if args.dynamic_threshold < 0 or args.report_videos < 0:
        parser.error("--dynamic-threshold and --report-videos must be non-negative")
    if args.cache is not None and not args.cache >= 0:
        parser.error(f"--cache {args.cache} must be a threshold of at least 0")
    if (error := sampler_error(args.shift, args.solver)) is not None:
        parser.error(f"--shift {args.shift} --solver {args.solver}: {error}")

    rank, world_size = init_distributed()  # (0, 1) without torchrun
    try:
        videos_dir = args.videos or os.path.join(args.out, "videos")
        if args.stage in ("generate", "all"):
            settings = GenerationSettings(
                num_frames=args.num_frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                guidance_scale=args.guidance, format=args.format, batch_size=args.batch_size,
            )
            videos_dir = generate_stage(args.model, args.prompts, args.out, settings, seed=args.seed,
                                        shift=args.shift, solver=args.solver, cache=args.cache, device=args.device,
                                        dtype=args.dtype, overwrite=args.overwrite, distributed=world_size > 1)
            if rank == 0:
                print(f"videos in {videos_dir}")
        if args.stage in ("score", "all") and rank == 0:
            metrics = score_stage(videos_dir, args.out, args.scorer, reference=args.reference, device=args.device,
                                  shape_rule=args.shape_rule, dynamic_threshold=args.dynamic_threshold,
                                  r_precision_distractors=args.r_precision_distractors,
                                  report_videos=args.report_videos)
            generated = metrics["generated"]
            print(" ".join(f"{k}={generated[k]:.2f}" for k in ("t2v/R1", "t2v/R5", "t2v/MedR", "v2t/R1")))
            print(f"metrics in {os.path.join(args.out, 'metrics.json')}, report in {os.path.join(args.out, 'report.html')}")
    except ValueError as e:
        parser.error(str(e))
    if world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

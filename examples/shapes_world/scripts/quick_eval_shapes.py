"""Shapes World read-back of a pipeline's generations, in memory: no video files, no codec, no retriever.

    python examples/shapes_world/scripts/quick_eval_shapes.py --model t2v/assets/default_model --per-category 32 --json out.json

Generates one video per prompt of `make_prompts(seed, per_category)` (seeds seed, seed + 1, ...) for each
guidance scale and flow shift, reads the attributes back from the frames and writes per-category accuracy. A
quick check for a freshly trained model (e.g. on a machine without ffmpeg); the full evaluation with retrieval metrics
is scripts/evaluate.py.
"""

import argparse
import json
import time

import torch
from diffusers.hooks import FirstBlockCacheConfig

from t2v.data.shapes import PROMPT_CATEGORIES, make_prompts
from t2v.eval.report import write_json
from t2v.eval.shapes_eval import generate_frames, readback_by_category


def _threshold(text: str) -> float | None:
    return None if text == "none" else float(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder")
    parser.add_argument("--per-category", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--guidance", type=float, nargs="+", default=[None], help="default: the model's")
    parser.add_argument("--shift", type=float, nargs="+", default=[None],
                        help="fixed flow shifts to try (default: the model's scheduler)")
    parser.add_argument("--solver", choices=["euler", "unipc"], default=None, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--categories", nargs="+", choices=list(PROMPT_CATEGORIES), default=None,
                        help="only these prompt categories (default: all)")
    parser.add_argument("--pooled", choices=["prompt", "empty"], default="prompt",
                        help="diagnostic: 'empty' gives the DiT the empty prompt's pooled vector (text only by tokens)")
    parser.add_argument("--shape-rule", choices=["template", "fill"], default="template",
                        help="shape read-back: template (best soft template) or fill (bounding-box fill)")
    parser.add_argument("--cache", type=_threshold, nargs="+", default=[None], metavar="THRESHOLD",
                        help="first-block cache thresholds to try, 'none' = no cache (default: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if any(c is not None and not c >= 0 for c in args.cache):
        raise SystemExit(f"--cache {args.cache}: every threshold must be at least 0")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size {args.batch_size} must be at least 1")
    from t2v.generation import sampler_error, set_sampler
    from t2v.pipelines import T2VPipeline

    for shift in args.shift:
        if (error := sampler_error(shift, args.solver)) is not None:
            raise SystemExit(f"--shift {shift} --solver {args.solver}: {error}")

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe = T2VPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
    defaults = pipe.config.generation_defaults
    steps = args.steps or defaults["num_inference_steps"]
    rows = make_prompts(args.seed, args.per_category)
    if args.categories:
        rows = [row for row in rows if row["category"] in args.categories]
    result = {"model": args.model, "per_category": args.per_category, "steps": steps, "device": args.device,
              "shape_rule": args.shape_rule, "pooled": args.pooled,
              "solver": args.solver or type(pipe.scheduler).__name__}
    scheduler = pipe.scheduler
    # Steps whose blocks after the first ran (a cached step skips them): the last block's MLP runs once per step.
    computed = [0]
    pipe.transformer.blocks[-1].mlp.register_forward_hook(lambda *_: computed.__setitem__(0, computed[0] + 1))
    runs = [(s, g, c) for s in args.shift for g in args.guidance for c in args.cache]
    for shift, guidance, cache in runs:
        pipe.scheduler = scheduler
        set_sampler(pipe, shift, args.solver)
        if pipe.transformer.is_cache_enabled:
            pipe.transformer.disable_cache()
        if cache is not None:
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=cache))
        guidance = defaults["guidance_scale"] if guidance is None else guidance
        key = f"guidance_{guidance:g}" if shift is None else f"shift_{shift:g}_guidance_{guidance:g}"
        if args.cache != [None]:
            key += f"_cache_{'none' if cache is None else f'{cache:g}'}"
        computed[0] = 0
        start = time.perf_counter()
        videos = generate_frames(pipe, [row["prompt"] for row in rows], [args.seed + i for i in range(len(rows))],
                                 args.batch_size, args.pooled, num_inference_steps=steps, guidance_scale=guidance)
        seconds = time.perf_counter() - start
        scores = readback_by_category(videos, rows, args.shape_rule)
        batches = -(-len(rows) // args.batch_size)
        result[key] = {"seconds": seconds, "steps_computed": computed[0], "steps_total": steps * batches, **scores}
        print(json.dumps({key: {c: round(s["all"], 3) for c, s in scores.items()},
                          "steps_computed": f"{computed[0]}/{steps * batches}", "seconds": round(seconds, 1)}),
              flush=True)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()

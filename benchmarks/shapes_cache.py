"""What the first-block step cache (`generate.py --cache T`) costs on Shapes World: read-back and retrieval.

    python scripts/make_shapes_prompts.py --out eval/prompts.jsonl --seed 0
    python benchmarks/shapes_cache.py --prompts eval/prompts.jsonl --out eval/cache \\
        --scorer retriever:t2v/assets/shapes_retriever --cache 0.2 none 0.1 \\
        --json benchmarks/results/cpu_shapes_cache_256.json

For each threshold ("none" = no cache), in the order given: the evaluation's generate stage on the same prompts
and seeds (prompt i, seed i), timed, with the steps whose later blocks actually ran counted (a cached step
skips them), then its score stage (attribute read-back, retrieval R@K with the given scorer). Each threshold's
videos and metrics go to OUT/THRESHOLD/; the JSON is rewritten after every threshold, so a stopped run keeps
what it finished.
"""

from __future__ import annotations

import argparse
import os
import time


def _threshold(text: str) -> float | None:
    if text == "none":
        return None
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"threshold {text!r} must be 'none' or at least 0")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="First-block cache thresholds: read-back and retrieval on Shapes World.")
    p.add_argument("--prompts", required=True, help="Shapes World prompts (.jsonl from make_shapes_prompts.py)")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped default model)")
    p.add_argument("--scorer", required=True, help="retriever:PATH | clip:PATH | xclip:PATH")
    p.add_argument("--out", required=True, help="folder for each threshold's videos and metrics")
    p.add_argument("--cache", type=_threshold, nargs="+", required=True, metavar="THRESHOLD")
    p.add_argument("--batch-size", type=int, default=8, help="as scripts/evaluate.py's default")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    import t2v
    from t2v.eval.evaluate import generate_prompts, read_prompts, score_stage
    from t2v.eval.report import write_json
    from t2v.generation import GenerationSettings
    from t2v.pipelines.loading import load_pipeline

    model = args.model or t2v.DEFAULT_MODEL
    batches = -(-len(read_prompts(args.prompts)) // args.batch_size)
    result = {"model": args.model or "t2v/assets/default_model", "prompts": args.prompts, "scorer": args.scorer, "batch_size": args.batch_size,
              "thresholds": {}}
    for threshold in args.cache:
        name = "none" if threshold is None else f"{threshold:g}"
        pipe = load_pipeline(model, args.device, None, cache=threshold)
        # Steps whose blocks after the first ran: the last block's MLP runs once per computed step.
        computed = [0]

        def count(*_, computed=computed):
            computed[0] += 1

        pipe.transformer.blocks[-1].mlp.register_forward_hook(count)
        settings = GenerationSettings(batch_size=args.batch_size)
        start = time.perf_counter()
        videos = generate_prompts(pipe, args.prompts, os.path.join(args.out, name), settings,
                                  recorded={"cache_threshold": threshold})
        seconds = time.perf_counter() - start
        steps = pipe.config.generation_defaults["num_inference_steps"]
        metrics = score_stage(videos, os.path.join(args.out, name), args.scorer, device=args.device)
        generated = metrics["generated"]
        result["thresholds"][name] = {
            "generate_seconds": seconds, "steps_computed": computed[0], "steps_total": steps * batches,
            "all_correct": generated["shapes"]["all"], "t2v/R1": generated["t2v/R1"],
            "t2v/MedR": generated["t2v/MedR"],
            "per_category": {c: {"all_correct": m["shapes"]["all"], "t2v/R1": m["t2v/R1"]}
                             for c, m in generated["per_category"].items()},
        }
        print(name, result["thresholds"][name], flush=True)
        if args.json:
            write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generate videos from text prompts.

    python generate.py "a large blue square moving up on a white background"
    python generate.py --prompt-file prompts.txt --out-dir outputs --steps 20 --seed 1
    torchrun --nproc_per_node 4 generate.py --prompt-file prompts.txt --out-dir outputs
    python generate.py "a red circle moving right" --model FRAME_CONDITIONED --image first.png
    python generate.py "a red circle moving right" --model BASE --lora runs/my_lora --lora-scale 0.8
    python generate.py "a red circle moving right" --model FRAME_CONDITIONED --extend start.mp4 --extend-times 3

Writes one video per prompt (00000.mp4, ... in prompt order) and manifest.jsonl into --out-dir. Under torchrun
the batches are split over the processes, and the videos and manifest are those of one process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, no usage dump; under torchrun rank 0 says it, once
        self.exit(2, f"generate.py: error: {message}\n" if os.environ.get("RANK", "0") == "0" else None)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Generate videos from text prompts with a t2v pipeline.")
    p.add_argument("prompts", nargs="*", help="one or more prompts")
    p.add_argument("--prompt-file", help="text file with one prompt per line")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped default model)")
    p.add_argument("--out-dir", default="outputs", help="output folder, new or empty (default: outputs)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds files: replace its videos and manifest.jsonl, remove nothing")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--shift", type=float, default=None,
                   help="fixed flow shift of the sampling schedule (default: the model's scheduler)")
    p.add_argument("--solver", choices=["euler", "unipc"], default=None,
                   help="sampler (default: the model's); unipc needs --shift")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--fps", type=int, default=None)
    p.add_argument("--format", choices=["mp4", "gif"], default="mp4")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer's blocks (the first batch pays the compilation)")
    p.add_argument("--memory", choices=["fast", "balanced", "low"], default="fast",
                   help="memory preset (t2v.pipelines.memory): fast = all on the device; balanced = model CPU "
                        "offload, VAE tiling and slicing; low = fp8 transformer weights, group offloading, VAE "
                        "tiling and slicing (default: fast)")
    p.add_argument("--cache", type=float, default=None, metavar="THRESHOLD",
                   help="first-block step cache: reuse the last computed step's output of the blocks after the "
                        "first when the first block's output changed by less than THRESHOLD (relative mean "
                        "absolute change); off by default")
    p.add_argument("--lora", default=None, metavar="FILE_OR_FOLDER",
                   help="LoRA adapter to apply: a diffusers LoRA file, or a folder holding "
                        "pytorch_lora_weights.safetensors (a LoRA training run writes one beside its pipeline)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the --lora adapter (default: 1)")
    # Given frames (a frame-conditioned model): image-to-video, extension, long videos by repeated extension.
    p.add_argument("--image", default=None, help="image to animate (a video: its first frame), resized to cover "
                   "the clip and centre-cropped")
    p.add_argument("--extend", default=None, help="video to extend: its first 1 + ft*k frames (whole latent "
                   "frames, fewer than --num-frames) start the clip; --num-frames is the total length")
    p.add_argument("--extend-times", type=int, default=0, help="extend N more times, each round given the last "
                   "--overlap frames of the video so far; the video is num_frames + N*(num_frames - overlap) long")
    p.add_argument("--overlap", type=int, default=None,
                   help="frames each extension round is given (1 + ft*k; default: about half the clip)")
    return p


def parse_and_check(argv: list[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from t2v.generation import out_dir_error, prompts_error, read_prompt_file, sampler_error, seed_error

    prompts = list(args.prompts)
    if args.prompt_file:
        try:
            prompts += read_prompt_file(args.prompt_file)
        except ValueError as e:
            parser.error(str(e))
    if not prompts:
        parser.error("no prompts: give prompts as arguments or --prompt-file FILE")
    if (error := prompts_error(prompts)) is not None:
        parser.error(error)
    # The generation settings (steps, guidance, clip shape, fps, batch size) are checked against the model,
    # by the pipeline, before anything is written.
    if (error := seed_error(args.seed, len(prompts))) is not None:
        parser.error(f"--{error}")
    if (error := out_dir_error(args.out_dir, args.overwrite)) is not None:
        parser.error(f"--out-dir: {error}")
    if (error := sampler_error(args.shift, args.solver)) is not None:
        parser.error(f"--shift {args.shift} --solver {args.solver}: {error}")
    if args.cache is not None and not args.cache >= 0:
        parser.error(f"--cache {args.cache} must be a threshold of at least 0")
    if args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r} is not a folder")
    if args.lora is not None and not os.path.exists(args.lora):
        parser.error(f"--lora {args.lora!r} is not a file or a folder")
    if args.lora is None and args.lora_scale != 1.0:
        parser.error("--lora-scale needs --lora")
    if not math.isfinite(args.lora_scale):
        parser.error(f"--lora-scale {args.lora_scale} must be finite")
    for flag, path in (("--image", args.image), ("--extend", args.extend)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag} {path!r} is not a file")
    if args.image is not None and args.extend is not None:
        parser.error("give --image or --extend, not both")
    if args.extend_times < 0:
        parser.error(f"--extend-times {args.extend_times} must be at least 0")
    return parser, args, prompts


def _warn_long_prompts(pipe, prompts: list[str]) -> None:
    """One line on stderr for each prompt longer than the text encoder reads (it is cut, not refused)."""
    if pipe.tokenizer is None:
        return
    limit = pipe.config.max_sequence_length
    for i, prompt in enumerate(prompts):
        tokens = len(pipe.tokenizer(prompt, truncation=False)["input_ids"])
        if tokens > limit:
            print(f"generate.py: warning: prompt {i} has {tokens} tokens; the model reads the first {limit}",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser, args, prompts = parse_and_check(argv)
    import torch.distributed as dist

    import t2v
    from t2v.generation import GenerationSettings, generate_to_folder
    from t2v.parallel.distributed import init_distributed
    from t2v.pipelines.loading import load_pipeline

    # Under torchrun every process checks the same arguments; then they join one group (its CUDA device is
    # this process's LOCAL_RANK) and share out the batches.
    rank, world_size = init_distributed()
    try:
        pipe = load_pipeline(args.model or t2v.DEFAULT_MODEL, args.device, args.dtype, args.shift, args.solver,
                             compile=args.compile, memory=args.memory, cache=args.cache, lora=args.lora,
                             lora_scale=args.lora_scale)
    except ValueError as error:
        parser.error(str(error))
    settings = GenerationSettings(
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        fps=args.fps,
        format=args.format,
        batch_size=args.batch_size,
        image=args.image,
        extend=args.extend,
        extend_times=args.extend_times,
        overlap=args.overlap,
    )
    seeds = [args.seed + i for i in range(len(prompts))]
    if rank == 0:
        _warn_long_prompts(pipe, prompts)
    try:
        rows = generate_to_folder(pipe, prompts, args.out_dir, seeds, settings, overwrite=args.overwrite,
                                  distributed=world_size > 1)
    except ValueError as e:
        parser.error(str(e))
    if rank == 0:
        for row in rows:
            print(os.path.join(args.out_dir, row["path"]), "<-", row["prompt"])
    if world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

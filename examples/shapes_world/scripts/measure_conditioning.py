"""Frame conditioning measured on Shapes World: image-to-video, extension and text-to-video on the same real clips.

    python examples/shapes_world/scripts/measure_conditioning.py --transformer RUN/pipeline/transformer \
        --clips 64 --json conditioning.json

For N clips per split (seen compositions, `sample_record(split="train")`, and held-out pairs, `split="heldout"`;
records from `default_rng(seed)`, clip i sampled with seed + i in every mode) and their canonical captions:

- vae_bound: the read-back of the VAE's reconstruction of each real clip (all 17 frames, and frames 9-16), and
  its PSNR. Every generation is decoded by this VAE, so none can beat it on average.
- text_to_video: the read-back of the clip generated from the caption alone.
- image_to_video: given frame 0 and the caption, the read-back of the generated clip (17 frames); frame-0 PSNR
  against the given frame, beside the VAE's reconstruction PSNR of that frame alone.
- extension: given frames 0-8 and the caption, 17 frames in all; the read-back of the generated frames 9-16
  only, and the seam profile (`t2v.eval.temporal.seam_profile`, seam at frame 9) beside the real clip's and the
  VAE reconstruction's (the real clip has no seam: it is the reference).

The read-back of frames 9-16 scores them against the clip's record as it stands: `score` compares background,
colour, shape, size and motion, never the start, and motion is read from the displacement between the first
and the last frame of the segment (7 x 2 = 14 px for a moving object against the 8 px still threshold; real
clips' frames 9-16 read back all correct, `real.readback_continuation`).

`--model` is a pipeline folder (default: the shipped default); `--transformer` a frame-conditioned VideoDiT
folder replacing its transformer, or `none`: the model's transformer made frame-conditioned with a zero mask
embedding (it computes what the model computes, with the given frames held).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import t2v
from t2v.data.shapes import NUM_FRAMES, SIZE, canonical_caption, render, sample_record
from t2v.eval.pixel_metrics import psnr
from t2v.eval.report import write_json
from t2v.eval.shapes_eval import generate_frames
from t2v.eval.shapes_readback import ATTRIBUTES, attribute_accuracy
from t2v.eval.temporal import seam_profile
from t2v.eval.vae_quality import reconstruct

SPLITS = ("train", "heldout")
SEAM = 9  # the extension is given frames 0-8 (three latent frames of a 4x temporal VAE) and generates 9-16
COLUMNS = ("all", *ATTRIBUTES)


def shapes_clips(clips: int, seed: int, split: str) -> tuple[list[dict], np.ndarray, list[str]]:
    """Records, uint8 clips (N, 17, 64, 64, 3) and canonical captions of `clips` records of `split`."""
    rng = np.random.default_rng(seed)
    records = [sample_record(rng, split=split) for _ in range(clips)]
    return records, np.stack([render(record) for record in records]), [canonical_caption(r) for r in records]


def _seam(videos: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean over clips of each part of the seam profile at SEAM."""
    return {name: {part: float(values.mean()) for part, values in parts.items()}
            for name, parts in seam_profile(videos, SEAM).items()}


def _psnr_db(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over clips of the PSNR (dB) of uint8 x against y, (N, ...) each."""
    return float(psnr(torch.from_numpy(x).flatten(1) / 255, torch.from_numpy(y).flatten(1) / 255).mean())


@torch.no_grad()
def _reconstruct(vae, videos: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([reconstruct(vae, torch.from_numpy(videos[b : b + batch_size])).numpy()
                           for b in range(0, len(videos), batch_size)])


@torch.no_grad()
def vae_bound(vae, records: list[dict], real: np.ndarray, batch_size: int) -> dict:
    """Read-back of the VAE's reconstructions of the real clips (all frames, and frames SEAM..), PSNR, seam."""
    recon = _reconstruct(vae, real, batch_size)
    return {"readback": attribute_accuracy(recon, records),
            "readback_continuation": attribute_accuracy(recon[:, SEAM:], records),
            "psnr_db": _psnr_db(recon, real), "seam": _seam(recon)}


@torch.no_grad()
def measure(pipe, clips: int, seed: int = 0, batch_size: int = 8, steps: int | None = None) -> dict:
    """Every quantity of the module docstring for `clips` clips per split, as a JSON-ready dict."""
    if pipe.given_frame_count(SEAM, NUM_FRAMES) != SEAM:
        raise ValueError(f"this VAE cannot be given exactly {SEAM} of {NUM_FRAMES} frames as whole latent frames")
    call = {"num_frames": NUM_FRAMES, "height": SIZE, "width": SIZE, "num_inference_steps": steps}
    result = {"clips": clips, "seed": seed, "seam": SEAM,
              "steps": steps or pipe.config.generation_defaults["num_inference_steps"],
              "guidance_scale": pipe.config.generation_defaults["guidance_scale"], "splits": {}, "seconds": {}}
    seconds = dict.fromkeys(("text_to_video", "image_to_video", "extension"), 0.0)
    for split in SPLITS:
        records, real, captions = shapes_clips(clips, seed, split)
        seeds = [seed + i for i in range(clips)]
        generated = {}
        for mode, given in (("text_to_video", {}), ("image_to_video", {"image": real[:, 0]}),
                            ("extension", {"video": real[:, :SEAM]})):
            start = time.perf_counter()
            generated[mode] = np.stack(generate_frames(pipe, captions, seeds, batch_size, **given, **call))
            seconds[mode] += time.perf_counter() - start
        recon_frame0 = _reconstruct(pipe.vae, real[:, :1], batch_size)
        result["splits"][split] = {
            "vae_bound": vae_bound(pipe.vae, records, real, batch_size),
            "text_to_video": {"readback": attribute_accuracy(generated["text_to_video"], records)},
            "image_to_video": {"readback": attribute_accuracy(generated["image_to_video"], records),
                               "frame0_psnr_db": _psnr_db(generated["image_to_video"][:, 0], real[:, 0]),
                               "vae_frame0_psnr_db": _psnr_db(recon_frame0[:, 0], real[:, 0])},
            "extension": {"readback_continuation": attribute_accuracy(generated["extension"][:, SEAM:], records),
                          "seam": _seam(generated["extension"])},
            "real": {"readback_continuation": attribute_accuracy(real[:, SEAM:], records), "seam": _seam(real)},
        }
    result["seconds"] = {mode: round(s, 1) for mode, s in seconds.items()}
    return result


def table(result: dict) -> str:
    """The result as Markdown: read-back rates, frame-0 PSNR, and the seam profile."""
    def pct(x):
        return f"{100 * x:.1f}%"

    lines = [f"{result['clips']} clips per split, seed {result['seed']}, {result['steps']} steps, "
             f"guidance {result['guidance_scale']:g}", "",
             "| split | clip | " + " | ".join("all-correct" if c == "all" else c for c in COLUMNS) + " |",
             "| --- | --- |" + " --- |" * len(COLUMNS)]
    rows = (("vae_bound", "readback", "VAE reconstruction (bound)"), ("text_to_video", "readback", "text-to-video"),
            ("image_to_video", "readback", "image-to-video"),
            ("vae_bound", "readback_continuation", "VAE reconstruction, frames 9-16 (bound)"),
            ("extension", "readback_continuation", "extension, frames 9-16"))
    for split, measured in result["splits"].items():
        for mode, key, name in rows:
            rates = measured[mode][key]
            lines.append(f"| {split} | {name} | " + " | ".join(pct(rates[c]) for c in COLUMNS) + " |")
    lines += ["", "| split | frame-0 PSNR | VAE frame-0 PSNR | VAE clip PSNR |", "| --- | --- | --- | --- |"]
    for split, measured in result["splits"].items():
        i2v = measured["image_to_video"]
        lines.append(f"| {split} | {i2v['frame0_psnr_db']:.2f} dB | {i2v['vae_frame0_psnr_db']:.2f} dB | "
                     f"{measured['vae_bound']['psnr_db']:.2f} dB |")
    lines += ["", f"Seam at frames {SEAM - 1}->{SEAM} (errors in [0, 255]; given part / seam / generated part)", "",
              "| split | clip | frame difference | motion-smoothness error |", "| --- | --- | --- | --- |"]
    for split, measured in result["splits"].items():
        for name, seam in (("real (no seam)", measured["real"]["seam"]),
                           ("VAE reconstruction", measured["vae_bound"]["seam"]),
                           ("extension", measured["extension"]["seam"])):
            cells = [" / ".join(f"{seam[m][p]:.2f}" for p in ("given", "seam", "generated"))
                     for m in ("frame_difference", "motion_smoothness")]
            lines.append(f"| {split} | {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def load_pipeline(model: str, transformer: str | None, device: str):
    """The pipeline at `model` with its transformer replaced by `transformer` (a folder, or "none": made
    frame-conditioned with a zero mask embedding); exits with one line unless the result is frame-conditioned."""
    from t2v.models.dit import VideoDiT, add_frame_conditioning
    from t2v.pipelines import T2VPipeline

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = T2VPipeline.from_pretrained(model, dtype=dtype)
    if transformer == "none":
        if pipe.transformer.config.frame_conditioning:
            raise SystemExit(f"--transformer none: the transformer of {model} is already frame-conditioned; "
                             "leave --transformer out")
        pipe.transformer = add_frame_conditioning(pipe.transformer)
    elif transformer is not None:
        pipe.transformer = VideoDiT.from_pretrained(transformer, torch_dtype=dtype).eval()
    if not pipe.transformer.config.frame_conditioning:
        raise SystemExit(f"the transformer of {transformer or model} is not frame-conditioned "
                         "(frame_conditioning=False): give a frame-conditioned one, or --transformer none")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.relpath(t2v.DEFAULT_MODEL),
                        help="pipeline folder (default: the shipped default)")
    parser.add_argument("--transformer", default=None,
                        help="frame-conditioned VideoDiT folder replacing the model's, or none (default: the model's)")
    parser.add_argument("--clips", type=int, default=64, help="clips per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bound-only", action="store_true", help="only the VAE bound (no generation)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.batch_size < 1:
        raise SystemExit(f"--clips {args.clips} and --batch-size {args.batch_size} must both be at least 1")
    if args.bound_only:  # the VAE's reconstructions only: no transformer, no generation
        from t2v.models.loading import load_vae

        vae = load_vae(os.path.join(args.model, "vae"), seed=0).float().to(args.device).eval()
        result = {"model": args.model, "clips": args.clips, "seed": args.seed, "splits": {}}
        for split in SPLITS:
            records, real, _ = shapes_clips(args.clips, args.seed, split)
            result["splits"][split] = {"vae_bound": vae_bound(vae, records, real, args.batch_size)}
            rates = result["splits"][split]["vae_bound"]
            print(f"{split}: all-correct {100 * rates['readback']['all']:.1f}% (frames {SEAM}-{NUM_FRAMES - 1}: "
                  f"{100 * rates['readback_continuation']['all']:.1f}%), PSNR {rates['psnr_db']:.2f} dB")
        if args.json:
            write_json(args.json, result)
        return
    pipe = load_pipeline(args.model, args.transformer, args.device)
    result = {"model": args.model, "transformer": args.transformer or "model's", "device": args.device,
              **measure(pipe, args.clips, args.seed, args.batch_size, args.steps)}
    print(table(result))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()

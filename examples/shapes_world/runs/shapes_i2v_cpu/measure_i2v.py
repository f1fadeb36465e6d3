"""Image-to-video on Shapes World clips: given frame 0 of a real clip and its caption, read the generated clip
back against the clip's record, and compare frame 0 with the given frame (PSNR).

    python examples/shapes_world/runs/shapes_i2v_cpu/measure_i2v.py --transformer RUN/pipeline/transformer \
        --clips 32 --out i2v.json

The pipeline is the shipped default with its transformer replaced (default settings: 30 steps, guidance 3).
`--transformer none` measures the shipped transformer made frame-conditioned with a zero mask embedding (the
model before conditioning training: it computes what the shipped one does, with frame 0 held).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import t2v
from t2v.data.shapes import canonical_caption, render, sample_record
from t2v.eval.pixel_metrics import psnr
from t2v.eval.shapes_readback import ATTRIBUTES, read_back, score
from t2v.models.dit import VideoDiT, add_frame_conditioning
from t2v.pipelines import T2VPipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--transformer", required=True, help="a frame-conditioned VideoDiT folder, or none")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    pipe = T2VPipeline.from_pretrained(t2v.DEFAULT_MODEL, dtype=torch.float32)
    if args.transformer == "none":
        pipe.transformer = add_frame_conditioning(pipe.transformer)
    else:
        pipe.transformer = VideoDiT.from_pretrained(args.transformer, torch_dtype=torch.float32).eval()
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(args.seed)
    records = [sample_record(rng, split=args.split) for _ in range(args.clips)]
    clips = np.stack([render(record) for record in records])  # (N, 17, 64, 64, 3)
    captions = [canonical_caption(record) for record in records]

    start, videos = time.time(), []
    for b in range(0, args.clips, args.batch_size):
        batch = slice(b, b + args.batch_size)
        frames = pipe(captions[batch], image=clips[batch, 0], output_type="np",
                      generator=[torch.Generator().manual_seed(args.seed + i)
                                 for i in range(b, min(b + args.batch_size, args.clips))]).frames
        videos.append((np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8))
    videos = np.concatenate(videos)  # (N, 17, 64, 64, 3)
    seconds = time.time() - start

    scores = [score(read_back(video), record) for video, record in zip(videos, records)]
    first = torch.from_numpy(videos[:, 0]).float() / 255
    given = torch.from_numpy(clips[:, 0]).float() / 255
    with torch.no_grad():  # the VAE's own reconstruction of frame 0: the ceiling of the first frame's PSNR
        pixels = torch.from_numpy(clips[:, :1]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (N, 3, 1, H, W)
        recon = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample[:, :, 0]
    recon = ((recon.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1)  # (N, H, W, 3)
    result = {
        "transformer": args.transformer,
        "clips": args.clips,
        "split": args.split,
        "seed": args.seed,
        "rates": {k: float(np.mean([s[k] for s in scores])) for k in (*ATTRIBUTES, "all")},
        "frame0_psnr_db": float(psnr(first, given).mean()),
        "vae_frame0_psnr_db": float(psnr(recon, given).mean()),
        "sampling_seconds": round(seconds, 1),
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

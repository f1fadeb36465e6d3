"""Encode a manifest into a latent + text-embedding cache (see t2v/data/cache.py).

    python scripts/precompute.py --manifest data.csv --vae runs/vae --text-encoder minilm \
        --out cache/ --frames 17 --height 64 --width 64

Several processes (e.g. `torchrun --nproc-per-node 4 scripts/precompute.py ...`, or RANK/WORLD_SIZE set
by hand) each encode a disjoint set of shards; rank 0 waits for the others and writes index.json.
"""

import argparse
import json
import os

import torch

from t2v.cli import user_errors
from t2v.data.cache import finalize_cache, write_cache
from t2v.data.manifest import load_manifest
from t2v.models.text_encoder import DTYPES, TextEmbedder, text_encoder_dtype


def load_vae(path: str, device: str):
    """A saved VAE of any class T2V can use (ours, Wan, CogVideoX, ...: `t2v.models.loading.load_vae_folder`)."""
    from t2v.models.loading import load_vae_folder

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--vae {path!r} is not a VAE folder (no config.json)")
    return load_vae_folder(path).to(device).eval()


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--vae", required=True, help="VAE folder saved with save_pretrained: ours, or diffusers' "
                        "Wan, CogVideoX, Hunyuan Video, LTX-Video (0.9.0) or Mochi VAE")
    parser.add_argument("--text-encoder", required=True, help="folder, hub id, 'minilm' or 'tiny-random'")
    parser.add_argument("--out", required=True)
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--fps", type=float, default=None, help="sampling fps (default: every frame)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=77, help="text tokens")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype the cache stores")
    parser.add_argument("--text-encoder-dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype the text encoder runs in (fp16 only on a GPU); a training run on the cache "
                        "sets the same model.text_encoder_dtype, as the cache's text fingerprint tells")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--columns", type=json.loads, default=None,
                        help='column mapping as JSON, e.g. \'{"path": "video", "caption": "caption"}\'')
    args = parser.parse_args(argv)

    with user_errors(__file__):
        run(args)


def run(args) -> None:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    text_dtype = text_encoder_dtype(args.text_encoder_dtype, device)  # refused before any model is loaded
    vae = load_vae(args.vae, device)
    text_embedder = TextEmbedder.from_pretrained(args.text_encoder, max_length=args.max_length, dtype=text_dtype)
    text_embedder = text_embedder.to(device)
    write_cache(
        args.out, args.manifest, vae, text_embedder, args.frames, args.height, args.width, fps=args.fps,
        batch_size=args.batch_size, shard_size=args.shard_size, rank=rank, world_size=world_size,
        dtype=DTYPES[args.dtype], num_workers=args.num_workers, columns=args.columns, progress=True,
    )
    if rank == 0:
        index = finalize_cache(args.out, len(load_manifest(args.manifest, args.columns)), args.shard_size, wait_seconds=24 * 3600)
        print(f"cached {index['num_samples']} samples in {len(index['shards'])} shards; skipped {index['skipped']}")


if __name__ == "__main__":
    main()

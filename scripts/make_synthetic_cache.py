"""A synthetic latent + text cache, to measure training at a real size with no data set and no downloads.

    python scripts/make_synthetic_cache.py --out /tmp/synthetic --vae base --text-dim 4096 --max-length 512 \
        --num 16 --frames 81 --height 480 --width 832

Writes three folders under --out:
    vae/           the VAE (--vae: a preset, YAML or folder; presets and YAMLs are a seeded random init)
    text_encoder/  a seeded random one-layer T5 encoder of width --text-dim with a character tokenizer:
                   T5-XXL-shaped states (width and length) for a fraction of its memory
    cache/         a LatentCache of --num rows: Gaussian posteriors of the VAE's latent shape for the clip
                   shape, and the text encoder's states of captions about --caption-chars characters long

Then train on it (any launcher, any distributed backend):
    python scripts/train.py --config configs/train/debug.yaml model.dit=1.3b data.source=cache \
        data.cache=/tmp/synthetic/cache model.vae=/tmp/synthetic/vae model.text_encoder=/tmp/synthetic/text_encoder \
        model.max_text_length=512 data.frames=81 data.height=480 data.width=832 data.batch_size=1

What it measures is speed and memory: the latents are noise and the text encoder is untrained.
"""

import argparse
import os
import string

import torch

from t2v.data.cache import (
    CacheFingerprint,
    finalize_cache,
    save_empty_caption,
    save_shard,
    shard_ranges,
    vae_fingerprint,
)
from t2v.models.loading import load_vae
from t2v.models.text_encoder import TextEmbedder
from t2v.models.vae_utils import latent_shape

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def save_random_t5(path: str, width: int, max_length: int, seed: int) -> None:
    """A one-layer T5 encoder of hidden size `width` and a lower-case character tokenizer, saved to `path`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    if width < 8:
        raise ValueError(f"--text-dim {width} must be at least 8")
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(string.printable.lower()) - set(string.whitespace)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=max_length)
    heads = max(1, min(16, width // 64))
    config = T5Config(vocab_size=len(vocab), d_model=width, d_kv=max(1, width // heads // 8), num_heads=heads,
                      d_ff=256, num_layers=1, pad_token_id=0, eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config)
    encoder.save_pretrained(path)
    tokenizer.save_pretrained(path)


def caption(i: int, chars: int) -> str:
    words = ["a", "camera", "slowly", "pans", "across", "a", "quiet", "street", "at", "dusk", "while", "people", "walk"]
    text = f"clip {i}:"
    while len(text) < chars:
        text += " " + words[(len(text) + i) % len(words)]
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--vae", required=True, help="preset name (e.g. base), YAML or folder")
    parser.add_argument("--text-dim", type=int, required=True, help="text encoder width (4096 = T5-XXL)")
    parser.add_argument("--max-length", type=int, default=512, help="text tokens")
    parser.add_argument("--caption-chars", type=int, default=300, help="caption length (one token per character)")
    parser.add_argument("--num", type=int, default=16, help="cache rows")
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num < 1:
        raise SystemExit(f"--num {args.num} must be at least 1")
    if os.path.exists(os.path.join(args.out, "cache")):
        raise SystemExit(f"{args.out}/cache exists; give an empty --out")

    vae = load_vae(args.vae, args.seed)
    try:
        shape = latent_shape(vae, args.frames, args.height, args.width)  # (C, T', H', W')
    except ValueError as e:
        raise SystemExit(f"clip {args.frames}x{args.height}x{args.width} does not fit the VAE: {e}") from None
    vae_dir, text_dir, cache_dir = (os.path.join(args.out, name) for name in ("vae", "text_encoder", "cache"))
    vae.save_pretrained(vae_dir)
    save_random_t5(text_dir, args.text_dim, args.max_length, args.seed)
    text = TextEmbedder.from_pretrained(text_dir, max_length=args.max_length)  # as the trainer loads it
    fingerprint = CacheFingerprint(vae=vae_fingerprint(vae), text_encoder=text.fingerprint(), frames=args.frames,
                                   height=args.height, width=args.width, fps=None, manifest="synthetic")
    print(f"latents {shape}, text ({args.max_length}, {text.dim}), {args.num} rows -> {cache_dir}")

    dtype = DTYPES[args.dtype]
    os.makedirs(cache_dir)
    save_empty_caption(cache_dir, text, fingerprint, dtype)
    generator = torch.Generator().manual_seed(args.seed)
    for start, end in shard_ranges(args.num, args.shard_size):
        captions = {str(i): caption(i, args.caption_chars) for i in range(start, end)}
        embedded = text(list(captions.values()))
        tensors = {}
        for b, i in enumerate(range(start, end)):
            tensors[f"{i}.latent_mean"] = torch.randn(shape, generator=generator).to(dtype)
            tensors[f"{i}.latent_logvar"] = torch.full(shape, -9.0, dtype=dtype)
            tensors[f"{i}.text_states"] = embedded.states[b].to(dtype)
            tensors[f"{i}.text_mask"] = embedded.mask[b]
            tensors[f"{i}.pooled"] = embedded.pooled[b].to(dtype)
        save_shard(cache_dir, start, end, tensors, captions, fingerprint)
    index = finalize_cache(cache_dir, args.num, args.shard_size)
    print(f"wrote {index['num_samples']} rows")


if __name__ == "__main__":
    main()

"""Convert Wan 2.1 text-to-video models (diffusers' `WanPipeline`, `WanTransformer3DModel`) to t2v's, or back.

    python scripts/convert_wan.py --src Wan2.1-T2V-1.3B-Diffusers --out runs/wan_1.3b
    python scripts/convert_wan.py --src runs/wan_1.3b --out runs/wan_again --to wan

--src is a pipeline folder or a transformer folder, and --out becomes the same kind. A WanPipeline folder
becomes a T2VPipeline folder: the transformer converted to a VideoDiT, Wan's VAE, umT5 text encoder,
tokenizer and scheduler kept as they are, WanPipeline's call defaults as generation defaults (see
t2v/pipelines/wan.py). With --to wan a T2VPipeline folder becomes a WanPipeline folder and a VideoDiT folder a
Wan transformer folder. Transformers keep their dtype, and the conversion is exact both ways (see
t2v/models/wan.py). A bad folder or a model that does not convert ends with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import os

from t2v.models.wan import WAN_DEFAULTS, transformer_from_wan, transformer_to_wan
from t2v.pipelines import T2VPipeline
from t2v.pipelines.wan import is_wan_pipeline_folder, pipeline_to_wan
from t2v.train.export import save_atomically


def convert(src: str, to: str, rope_max_seq_len: int):
    """The converted pipeline or transformer of folder `src`."""
    if not os.path.isfile(os.path.join(src, "model_index.json")):
        return transformer_from_wan(src) if to == "t2v" else transformer_to_wan(src, rope_max_seq_len)
    if to == "t2v":
        if not is_wan_pipeline_folder(src):
            raise ValueError(f"{src!r} is a pipeline folder, but its transformer is not a WanTransformer3DModel")
        return T2VPipeline.from_pretrained(src)
    if is_wan_pipeline_folder(src):
        raise ValueError(f"{src!r} is a Wan pipeline folder already")
    return pipeline_to_wan(T2VPipeline.from_pretrained(src), rope_max_seq_len)


def main(argv=None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--src", required=True, help="pipeline or transformer folder (ours with --to wan)")
    parser.add_argument("--out", required=True, help="folder to write (replaces a model there)")
    parser.add_argument("--to", choices=("t2v", "wan"), default="t2v", help="t2v: Wan -> t2v; wan: back")
    parser.add_argument("--rope-max-seq-len", type=int, default=WAN_DEFAULTS["rope_max_seq_len"],
                        help="with --to wan: Wan's RoPE table length (most latent frames/rows/columns)")
    args = parser.parse_args(argv)
    if args.to == "t2v" and args.rope_max_seq_len != WAN_DEFAULTS["rope_max_seq_len"]:
        parser.error("--rope-max-seq-len applies only with --to wan")
    if not os.path.isdir(args.src):
        parser.error(f"{args.src!r} is not a folder")

    try:
        converted = convert(args.src, args.to, args.rope_max_seq_len)
        save_atomically(converted, args.out)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    transformer = getattr(converted, "transformer", converted)
    count = sum(p.numel() for p in transformer.parameters())
    print(f"wrote {args.out}: {type(converted).__name__} ({type(transformer).__name__} of {count / 1e6:.1f}M "
          f"parameters) from {args.src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

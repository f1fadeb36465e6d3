"""Convert a Wan 2.1 text-to-video transformer (diffusers' `WanTransformer3DModel`) to a VideoDiT, or back.

    python scripts/convert_wan.py --src Wan2.1-T2V-1.3B-Diffusers --out runs/wan_1.3b/transformer
    python scripts/convert_wan.py --src runs/wan_1.3b/transformer --out runs/wan_again --to wan

--src is a transformer folder, or a pipeline folder whose transformer/ is read. The converted transformer is
written with save_pretrained (safetensors, the source's dtype); the conversion is exact both ways (see
t2v/models/wan.py). A bad folder or a config that does not convert ends with one line and exit status 2.
"""

from __future__ import annotations

import argparse

from t2v.models.wan import WAN_DEFAULTS, transformer_from_wan, transformer_to_wan
from t2v.train.export import save_atomically


def main(argv=None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--src", required=True, help="transformer or pipeline folder (ours with --to wan)")
    parser.add_argument("--out", required=True, help="transformer folder to write (replaces a model there)")
    parser.add_argument("--to", choices=("t2v", "wan"), default="t2v", help="t2v: Wan -> VideoDiT; wan: back")
    parser.add_argument("--rope-max-seq-len", type=int, default=WAN_DEFAULTS["rope_max_seq_len"],
                        help="with --to wan: Wan's RoPE table length (most latent frames/rows/columns)")
    args = parser.parse_args(argv)
    if args.to == "t2v" and args.rope_max_seq_len != WAN_DEFAULTS["rope_max_seq_len"]:
        parser.error("--rope-max-seq-len applies only with --to wan")

    try:
        if args.to == "t2v":
            model = transformer_from_wan(args.src)
        else:
            model = transformer_to_wan(args.src, rope_max_seq_len=args.rope_max_seq_len)
        save_atomically(model, args.out)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {type(model).__name__}, {count / 1e6:.1f}M parameters, from {args.src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

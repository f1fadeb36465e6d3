"""Attribute read-back and PSNR of a VAE's reconstructions of real Shapes World clips (the bound on any
model decoded by it).

    python examples/shapes_world/scripts/eval_shapes_vae.py --vae t2v/assets/default_model/vae --num 256 --seed 11 [--json FILE]
"""

import argparse
import json

import torch

from t2v.eval.report import write_json
from t2v.eval.vae_quality import vae_readback
from t2v.models.loading import load_vae


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="VAE folder (save_pretrained) or a config name")
    parser.add_argument("--num", type=int, default=256, help="clips (one or two objects each)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--split", choices=["train", "heldout"], default="train")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shape-rule", choices=["template", "fill"], default="template",
                        help="shape read-back: template (best soft template) or fill (bounding-box fill)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num {args.num} must be at least 1")
    vae = load_vae(args.vae, seed=0).to(args.device).eval()
    if next(vae.parameters()).dtype != torch.float32:  # shipped weights are fp16; fp16 on CPU is very slow
        vae = vae.float()
    result = {"vae": args.vae, "num": args.num, "seed": args.seed, "split": args.split,
              "shape_rule": args.shape_rule,
              **vae_readback(vae, args.num, args.seed, args.split, args.batch_size, shape_method=args.shape_rule)}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Package a trained pipeline folder as the shipped default model (half-precision safetensors).

    python scripts/ship_default.py --pipeline runs/shapes_default/dit/pipeline --out t2v/assets/default_model \
        --steps 20 --guidance 4.0

The text encoder is not copied: the folder names it ("minilm", the pip-installed offline MiniLM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from pipelines import T2VPipeline  # noqa: E402
from t2v.models.dit import VideoDiT  # noqa: E402
from t2v.models.text_encoder import MINILM  # noqa: E402
from t2v.models.vae import CausalVideoVAE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="trained pipeline folder (transformer/, vae/, scheduler/)")
    p.add_argument("--out", required=True)
    p.add_argument("--text-encoder", default=MINILM, help="name or path the shipped folder loads its encoder from")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--shift", type=float, default=None, help="fixed sampling shift (default: keep the trained one)")
    args = p.parse_args()

    src = args.pipeline
    index = T2VPipeline.load_config(src)
    transformer = VideoDiT.from_pretrained(os.path.join(src, "transformer")).to(torch.float16)
    vae = CausalVideoVAE.from_pretrained(os.path.join(src, "vae")).to(torch.float16)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(src, "scheduler"))
    if args.shift is not None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=args.shift)
    defaults = dict(index["generation_defaults"])
    if args.steps is not None:
        defaults["num_inference_steps"] = args.steps
    if args.guidance is not None:
        defaults["guidance_scale"] = args.guidance
    pipe = T2VPipeline(vae=vae, transformer=transformer, scheduler=scheduler, text_encoder_source=args.text_encoder,
                       max_sequence_length=index["max_sequence_length"], generation_defaults=defaults)
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".default.tmp-", dir=parent)
    pipe.save_pretrained(tmp)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out} ({size / 2**20:.1f} MB), defaults {defaults}")


if __name__ == "__main__":
    main()

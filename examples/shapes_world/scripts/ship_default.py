"""Package a trained pipeline folder as the shipped default model (half-precision safetensors).

    python examples/shapes_world/scripts/ship_default.py --pipeline runs/shapes_default/dit/pipeline --out t2v/assets/default_model \
        --steps 20 --guidance 4.0 [--vae runs/shapes_default/vae_decoder/vae]

The text encoder is not copied: the folder names it ("minilm", the pip-installed offline MiniLM).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from t2v.models.dit import VideoDiT
from t2v.models.text_encoder import MINILM
from t2v.models.vae import CausalVideoVAE
from t2v.pipelines import T2VPipeline
from t2v.train.export import save_atomically


def same_latent_space(trained: CausalVideoVAE, replacement: CausalVideoVAE, where: str) -> CausalVideoVAE:
    """`replacement` if its encoder weights and latent normalisation equal `trained`'s; else a ValueError."""
    for key in ("scaling_factor", "shift_factor", "latent_channels"):
        if trained.config[key] != replacement.config[key]:
            raise ValueError(f"--vae {where}: {key}={replacement.config[key]} but the pipeline's VAE has "
                             f"{trained.config[key]}; only a decoder fine-tune of the pipeline's VAE can replace it")
    ours, theirs = trained.encoder.state_dict(), replacement.encoder.state_dict()
    changed = [k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k])]
    if changed or len(ours) != len(theirs):
        raise ValueError(f"--vae {where}: encoder weights differ from the pipeline's VAE ({changed[:3]}...); the DiT "
                         "was trained on that encoder's latents, so only a decoder fine-tune can replace it")
    return replacement


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="trained pipeline folder (transformer/, vae/, scheduler/)")
    p.add_argument("--out", required=True)
    p.add_argument("--text-encoder", default=MINILM, help="name or path the shipped folder loads its encoder from")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--vae", default=None,
                   help="a VAE folder to ship instead of the pipeline's: a decoder fine-tune of it (same encoder and "
                        "latent normalisation, checked), so the DiT's latent space is unchanged")
    p.add_argument("--shift", type=float, default=None, help="fixed sampling shift (default: keep the trained one)")
    args = p.parse_args()

    src = args.pipeline
    index = T2VPipeline.load_config(src)
    transformer = VideoDiT.from_pretrained(os.path.join(src, "transformer")).to(torch.float16)
    vae = CausalVideoVAE.from_pretrained(os.path.join(src, "vae"))
    if args.vae is not None:
        vae = same_latent_space(vae, CausalVideoVAE.from_pretrained(args.vae), args.vae)
    vae = vae.to(torch.float16)
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
    save_atomically(pipe, args.out, finish=_drop_local_paths)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out} ({size / 2**20:.1f} MB), defaults {defaults}")


def _drop_local_paths(folder: str) -> None:
    """The training machine's paths do not belong in a shipped model."""
    for component in ("transformer", "vae"):
        config_path = os.path.join(folder, component, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config.pop("_name_or_path", None)
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    main()

"""Give a trained VAE a new, freshly initialised decoder of other widths / depth, keeping its encoder.

The encoder weights and the latent normalisation are copied unchanged, so a DiT trained on this VAE's latents
still applies; train the new decoder with the encoder frozen (`model.trainable=[decoder]`), then ship it with
`scripts/ship_default.py --vae`.

    python scripts/new_vae_decoder.py --vae t2v/assets/default_model/vae --widths 32,64,96,96 --layers 1 \
        --out runs/wide_decoder_init
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

from t2v.models.vae import CausalVideoVAE


def with_new_decoder(vae: CausalVideoVAE, widths: list[int], layers: int, seed: int) -> CausalVideoVAE:
    """A CausalVideoVAE with `vae`'s config and encoder weights and a new decoder (`widths`, `layers`), fp32."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    config.update(decoder_block_out_channels=list(widths), decoder_layers_per_block=layers)
    torch.manual_seed(seed)
    new = CausalVideoVAE(**config)
    new.encoder.load_state_dict({k: v.float() for k, v in vae.encoder.state_dict().items()})
    return new


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="trained CausalVideoVAE folder (save_pretrained)")
    parser.add_argument("--widths", required=True, help="decoder widths per level, encoder order, e.g. 32,64,96,96")
    parser.add_argument("--layers", type=int, required=True, help="decoder res blocks per level, minus one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        parser.error(f"--widths {args.widths!r} must be comma-separated integers")
    new = with_new_decoder(CausalVideoVAE.from_pretrained(args.vae), widths, args.layers, args.seed)
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".new_decoder_")
    new.save_pretrained(tmp, safe_serialization=True)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    count = sum(p.numel() for p in new.decoder.parameters())
    print(f"wrote {args.out}: encoder from {args.vae}, new decoder {widths} x {args.layers} ({count / 1e6:.2f}M params)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Start a DiT of a new configuration from a trained one: warm-start for a new VAE or patch size.

Every tensor whose name and shape are the same in both models is copied from the trained DiT; the rest keep
the new model's fresh initialisation (for a new patch size or latent width: the patch embedding and the output
projection, the latter zero, so the new model starts by predicting zero velocity; where their shapes match too,
they are copied like the rest). The blocks, the text and timestep embedders and the adaLN tables carry over,
all of them: a new config that would leave any other tensor fresh (another MLP width, say) is refused. When
the new VAE cell times the new patch covers the same pixels as before (4x VAE with 2x2 patches after 8x VAE
with 1x1 patches), the token grid is unchanged and only the mapping between latents and tokens has to be
learnt anew. Train the result with `model.dit=OUT`.

    python examples/shapes_world/scripts/init_dit_from.py --dit t2v/assets/default_model/transformer --config shapes_p2 \
        --out runs/dit_p2_init
"""

from __future__ import annotations

import argparse

import torch

from t2v.models.dit import VideoDiT
from t2v.models.loading import build_model
from t2v.train.export import save_atomically

NEW_PER_LATENT = ("patch_embed.", "proj_out.")  # the only tensors a new VAE or patch size may leave fresh


@torch.no_grad()
def transplant(old: torch.nn.Module, new: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Copy `old`'s tensors into `new` where name and shape match. Returns (copied, kept-new) names."""
    old_state = old.state_dict()
    copied, fresh = [], []
    for name, tensor in new.state_dict().items():
        source = old_state.get(name)
        if source is not None and source.shape == tensor.shape:
            tensor.copy_(source.to(tensor.dtype))
            copied.append(name)
        else:
            fresh.append(name)
    return copied, fresh


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit", required=True, help="trained VideoDiT folder (save_pretrained)")
    parser.add_argument("--config", required=True, help="new DiT: preset name (shapes_p2) or YAML of its arguments")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh initialisation")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    args = parser.parse_args(argv)

    old = VideoDiT.from_pretrained(args.dit).float()
    new = build_model(VideoDiT, args.config, "dit", args.seed).float()
    for key in ("hidden_size", "num_layers", "num_heads", "text_dim", "pooled_dim"):
        if old.config[key] != new.config[key]:
            raise ValueError(f"{key}: the trained DiT has {old.config[key]}, the new config {new.config[key]}; "
                             "warm-starting needs the same width, depth, heads and text dimensions")
    copied, fresh = transplant(old, new)
    unmatched = [name for name in fresh if not name.startswith(NEW_PER_LATENT)]
    if unmatched:
        raise ValueError(f"the new config would leave {unmatched[:4]} fresh ({len(unmatched)} tensors beyond the "
                         f"patch embedding and output projection): only {NEW_PER_LATENT} may differ")
    save_atomically(new, args.out)
    print(f"wrote {args.out}: {len(copied)} tensors from {args.dit}, {len(fresh)} new: {', '.join(fresh)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

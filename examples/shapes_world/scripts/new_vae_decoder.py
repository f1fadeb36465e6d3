"""Give a trained VAE a wider and/or deeper decoder, keeping its encoder (and so its latent space).

The encoder weights and the latent normalisation are copied unchanged, so a DiT trained on this VAE's latents
still applies; train the new decoder with the encoder frozen (`model.trainable=[decoder]`), then ship it with
`examples/shapes_world/scripts/ship_default.py --vae`.

By default the new decoder starts as the old one (`--init grow`): it decodes exactly what the old decoder
decoded, and only training makes use of the added channels and blocks. Each old weight is copied into its
place; the weights that write into a new channel start at zero (so new channels start at zero everywhere),
the weights that read from one keep their random initialisation (so they receive gradient at once); RMS-norm
gains are rescaled for the larger channel count, attention queries for the larger head dimension, and an added
res block starts as the identity (its second conv at zero). `--init random` starts the decoder from scratch.

    python examples/shapes_world/scripts/new_vae_decoder.py --vae t2v/assets/default_model/vae --widths 32,64,128,128 --layers 1 \
        --out runs/wide_decoder_init
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from t2v.models.vae import CausalVideoVAE, ChannelRMSNorm, ResBlock, SpatialAttention, Upsample
from t2v.train.export import save_atomically


def _grow_conv(old: nn.Conv2d | nn.Conv3d, new: nn.Conv2d | nn.Conv3d, groups: int = 1,
               first_group_scale: float = 1.0) -> None:
    """Copy `old` into the leading channels of `new`; rows writing into new output channels are zeroed.

    The output channels are `groups` blocks laid out (group, channel) (2 for a temporal upsampling's frame
    pair, 3 for q, k, v); the first block is multiplied by `first_group_scale`.
    """
    out_old, out_new = old.out_channels // groups, new.out_channels // groups
    in_old = old.in_channels
    w_old = old.weight.view(groups, out_old, *old.weight.shape[1:])
    w_new = new.weight.view(groups, out_new, *new.weight.shape[1:])
    w_new[:, out_old:] = 0
    w_new[:, :out_old, :in_old] = w_old
    w_new[0, :out_old, :in_old] *= first_group_scale
    b_old, b_new = old.bias.view(groups, out_old), new.bias.view(groups, out_new)
    b_new.zero_()
    b_new[:, :out_old] = b_old
    b_new[0, :out_old] *= first_group_scale


def _check_same_layout(old: nn.Module, new: nn.Module) -> None:
    old_kinds = [type(m).__name__ for m in old.modules()]
    new_kinds = [type(m).__name__ for m in new.modules()]
    if old_kinds != new_kinds:
        raise ValueError("--init grow needs the old decoder's block layout (the same res blocks, with or without a "
                         "shortcut conv, in the same order) inside the new one; widths that keep which levels "
                         "change width (e.g. all doubled) do; use --init random otherwise")


@torch.no_grad()
def grow_decoder(old: nn.Module, new: nn.Module) -> None:
    """Make `new` (wider, same block layout per level, possibly more res blocks per level) compute what `old`
    computes. Both are `t2v.models.vae.Decoder`s; `new` is modified in place."""
    old_blocks, new_blocks = list(old.blocks), list(new.blocks)
    matched, j = [], 0
    for block in old_blocks:  # each old block goes to the next new block of its kind; the rest are added
        while j < len(new_blocks) and type(new_blocks[j]) is not type(block):
            j += 1
        if j == len(new_blocks):
            raise ValueError(f"the new decoder has no place for old block {type(block).__name__}")
        matched.append((block, new_blocks[j]))
        j += 1
    for block in new_blocks:
        if isinstance(block, ResBlock) and all(block is not n for _, n in matched):
            if not isinstance(block.shortcut, nn.Identity):
                raise ValueError("an added res block must keep its width (it starts as the identity)")
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()
    pairs = [(old.conv_in, new.conv_in), (old.norm_out, new.norm_out), (old.conv_out, new.conv_out), *matched]
    for old_part, new_part in pairs:
        _check_same_layout(old_part, new_part)
        for (name, old_module), new_module in zip(old_part.named_modules(), new_part.modules()):
            if isinstance(old_module, ChannelRMSNorm):
                c_old, c_new = old_module.weight.numel(), new_module.weight.numel()
                new_module.weight.fill_(1.0)
                new_module.weight[:c_old] = old_module.weight * math.sqrt(c_old / c_new)
            elif isinstance(old_module, SpatialAttention):
                # q . k / sqrt(C): scale q so the larger C gives the same logits
                scale = math.sqrt(new_module.proj.out_channels / old_module.proj.out_channels)
                _grow_conv(old_module.to_qkv, new_module.to_qkv, groups=3, first_group_scale=scale)
                _grow_conv(old_module.proj, new_module.proj)
            elif isinstance(old_module, Upsample) and old_module.temporal is not None:
                _grow_conv(old_module.temporal, new_module.temporal, groups=2)
            elif isinstance(old_module, (nn.Conv2d, nn.Conv3d)):
                if name.endswith(("to_qkv", "proj")) or (name.endswith("temporal") and isinstance(old_part, Upsample)):
                    continue  # done with their parent above
                _grow_conv(old_module, new_module)


def with_new_decoder(vae: CausalVideoVAE, widths: list[int], layers: int, seed: int,
                     init: str = "grow") -> CausalVideoVAE:
    """A CausalVideoVAE with `vae`'s config and encoder weights and a new decoder (`widths`, `layers`), fp32."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    old_widths = config.get("decoder_block_out_channels") or config["block_out_channels"]
    old_layers = config.get("decoder_layers_per_block") or config["layers_per_block"]
    if init == "grow" and (any(n < o for n, o in zip(widths, old_widths)) or layers < old_layers):
        raise ValueError(f"--init grow: widths {widths} x {layers} must be at least the old decoder's "
                         f"{list(old_widths)} x {old_layers} at every level")
    config.update(decoder_block_out_channels=list(widths), decoder_layers_per_block=layers)
    torch.manual_seed(seed)
    new = CausalVideoVAE(**config)
    new.encoder.load_state_dict({k: v.float() for k, v in vae.encoder.state_dict().items()})
    if init == "grow":
        grow_decoder(vae.decoder.float(), new.decoder)
    elif init != "random":
        raise ValueError(f"init={init!r} must be 'grow' or 'random'")
    return new


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="trained CausalVideoVAE folder (save_pretrained)")
    parser.add_argument("--widths", required=True, help="decoder widths per level, encoder order, e.g. 32,64,96,96")
    parser.add_argument("--layers", type=int, required=True, help="decoder res blocks per level, minus one")
    parser.add_argument("--init", choices=["grow", "random"], default="grow",
                        help="grow: start as the old decoder (default); random: a fresh decoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        parser.error(f"--widths {args.widths!r} must be comma-separated integers")
    new = with_new_decoder(CausalVideoVAE.from_pretrained(args.vae), widths, args.layers, args.seed, args.init)
    save_atomically(new, args.out)
    count = sum(p.numel() for p in new.decoder.parameters())
    print(f"wrote {args.out}: encoder from {args.vae}, decoder {widths} x {args.layers} ({count / 1e6:.2f}M params, "
          f"init {args.init})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Wan 2.1 LoRA tensors in diffusers' names (`transformer.blocks.0.attn1.to_q.lora_A.weight`, ...) as LoRA tensors of
the converted VideoDiT (`t2v.models.wan`), exactly.

Wan's separate q, k, v projections are one fused `to_qkv` here (k, v one `to_kv` in cross-attention), so separate
LoRAs on the parts, each with its scale s_i = alpha_i / r_i, become one LoRA on the fused layer:

    [s_q B_q A_q; s_k B_k A_k; s_v B_v A_v] = blockdiag(s_q B_q, s_k B_k, s_v B_v) @ [A_q; A_k; A_v]

A stacked along the rank (sum r_i, in), B block-diagonal (sum out_i, sum r_i); a part without a LoRA is a zero
block. Every scale is folded into B, so the converted tensors carry no metadata: loaded without it, diffusers gives
each layer alpha = its rank, scale 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from t2v.models.wan import tensor_pairs

StateDict = dict[str, torch.Tensor]
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def is_wan_lora(state_dict: Mapping[str, torch.Tensor], prefix: str = "transformer") -> bool:
    """Whether the keys name Wan's modules (attn1, attn2, ffn, condition_embedder) rather than VideoDiT's."""
    wan_names = (".attn1.", ".attn2.", ".ffn.", "condition_embedder.")
    return any(key.startswith(f"{prefix}.") and any(n in key for n in wan_names) for key in state_dict)


def _scale(module: str, rank: int, metadata: Mapping | None) -> float:
    """alpha / rank of a Wan module's LoRA as PEFT computes it from the adapter's LoraConfig (1 without one)."""
    if metadata is None:
        return 1.0
    from peft.utils.other import get_pattern_key

    if metadata.get("use_dora") or metadata.get("lora_bias"):
        raise ValueError("Wan LoRA with use_dora or lora_bias cannot be converted to VideoDiT's fused layers")
    patterns = metadata.get("alpha_pattern") or {}
    key = get_pattern_key(patterns.keys(), module)
    alpha = patterns.get(key, metadata.get("lora_alpha", rank))
    return alpha / (math.sqrt(rank) if metadata.get("use_rslora") else rank)


def wan_lora_to_video_dit(state_dict: Mapping[str, torch.Tensor], metadata: Mapping | None = None,
                          prefix: str = "transformer") -> StateDict:
    """Wan LoRA tensors (`<prefix>.<Wan module>.lora_A.weight` / `lora_B.weight`) as VideoDiT's, scales folded in.

    `metadata` is the adapter's LoraConfig dict as diffusers stores it (keys prefixed "<prefix>."), or None
    (every scale 1). Raises ValueError naming keys that are not LoRA A/B weights of Wan's linear layers.
    """
    meta = None if metadata is None else {k.removeprefix(f"{prefix}."): v for k, v in metadata.items()}
    lora = {}  # Wan module -> {"A": (r, in), "B": (out, r)}
    for key, tensor in state_dict.items():
        match = re.fullmatch(rf"{re.escape(prefix)}\.(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise ValueError(f"Wan LoRA key {key!r} is not a '{prefix}.<module>.lora_A/lora_B.weight' tensor")
        lora.setdefault(match.group(1), {})[match.group(2)] = tensor
    if half := sorted(m for m, ab in lora.items() if len(ab) != 2):
        raise ValueError(f"Wan LoRA modules {half[:3]} have lora_A or lora_B but not both")

    num_layers = 1 + max((int(m.group(1)) for name in lora if (m := _BLOCK.match(name))), default=-1)
    # Our linear layer and its Wan parts, in the order they are concatenated (conv patch embedding excluded).
    fused = {ours.removesuffix(".bias"): [w.removesuffix(".bias") for w in wan]
             for ours, wan in tensor_pairs(num_layers, cross_attn_norm=False)
             if ours.endswith(".bias") and ours != "patch_embed.bias"}  # fmt: skip
    if unknown := sorted(set(lora) - {w for parts in fused.values() for w in parts}):
        raise ValueError(f"Wan LoRA modules {unknown[:3]} are not linear layers of a Wan 2.1 T2V transformer")

    out = {}
    for ours, parts in fused.items():
        present = [w for w in parts if w in lora]
        if not present:
            continue
        part_out = lora[present[0]]["B"].shape[0]  # Wan's fused parts (q, k, v or k, v) share one width
        downs, ups = [], []
        for index, wan in enumerate(parts):
            if wan not in lora:
                continue
            down, up = lora[wan]["A"], lora[wan]["B"]  # (r, in), (out, r)
            rank = down.shape[0]
            block = up.new_zeros(part_out * len(parts), rank)  # (sum out, r): rows of this part only
            block[index * part_out:(index + 1) * part_out] = up * _scale(wan, rank, meta)
            downs.append(down)
            ups.append(block)
        out[f"{prefix}.{ours}.lora_A.weight"] = torch.cat(downs).contiguous()  # (sum r, in)
        out[f"{prefix}.{ours}.lora_B.weight"] = torch.cat(ups, dim=1).contiguous()  # (sum out, sum r)
    return out

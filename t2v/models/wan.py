"""Wan 2.1 text-to-video transformers (diffusers' `WanTransformer3DModel`) as `VideoDiT`, and back.

A Wan 2.1 T2V transformer is a `VideoDiT` with the full attention layout, no pooled text vector and the Wan
switches on (`config_from_wan`): QK RMS-norm across heads, final modulation of the time embedding plus a
learned table, padded text tokens attended, RoPE angles in float64, and the modules diffusers keeps in float32
when it loads Wan in bf16 (`_keep_in_fp32_modules`) kept so too. Every tensor maps to one of ours:

    Wan                                            VideoDiT
    patch_embedding (Conv3d, D C pt ph pw)         patch_embed (Linear, D (pt ph pw C))
    condition_embedder.time_embedder.linear_1/2    time_embed.0/2
    condition_embedder.time_proj                   adaln.1
    condition_embedder.text_embedder.linear_1/2    text_embed.0/2
    blocks.i.scale_shift_table (1, 6, D)           blocks.i.modulation (6, D)
    blocks.i.attn1.to_q, to_k, to_v                blocks.i.self_attns.0.to_qkv (concatenated)
    blocks.i.attn1.norm_q, norm_k, to_out.0        blocks.i.self_attns.0.norm_q, norm_k, to_out
    blocks.i.attn2.to_q, norm_q, norm_k, to_out.0  blocks.i.cross_attn.to_q, norm_q, norm_k, to_out
    blocks.i.attn2.to_k, to_v                      blocks.i.cross_attn.to_kv (concatenated)
    blocks.i.norm2 (if cross_attn_norm)            blocks.i.norm_cross
    blocks.i.ffn.net.0.proj, ffn.net.2             blocks.i.mlp.0, mlp.2
    scale_shift_table (1, 2, D)                    modulation_out (2, D)
    proj_out                                       proj_out

Only reshapes, concatenations and splits: converting there and back returns every tensor bit for bit.
Image-conditioned Wan (I2V, FLF2V: `image_dim`, `added_kv_proj_dim`) has no VideoDiT counterpart.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from diffusers.utils.constants import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from einops import rearrange
from safetensors.torch import load_file
from torch import nn

from t2v.models.dit import VideoDiT, default_rope_axes_dim, in_fp32_modules

WAN_CLASS = "WanTransformer3DModel"
WAN_QK_NORMS = ("rms_norm_across_heads", None)  # diffusers normalizes across heads whichever is set
WAN_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(WanTransformer3DModel.__init__).parameters.items()
    if name != "self"
}
IMAGE_OPTIONS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------


def config_from_wan(wan_config: Mapping) -> dict:
    """`VideoDiT` arguments for a `WanTransformer3DModel` config (a dict or a model's `.config`).

    Keys Wan leaves out take Wan's defaults; `rope_max_seq_len` is dropped (our RoPE is computed for the
    actual grid, so it has no length limit). Image conditioning and unknown keys are refused.
    """
    given = {key: value for key, value in wan_config.items() if not key.startswith("_")}
    if wan_config.get("_class_name", WAN_CLASS) != WAN_CLASS:
        raise ValueError(f"config is for a {wan_config['_class_name']}, not a {WAN_CLASS}")
    unknown = sorted(set(given) - set(WAN_DEFAULTS))
    if unknown:
        raise ValueError(f"Wan config has keys this converter does not know: {unknown}")
    config = {**WAN_DEFAULTS, **given}
    image = {key: config[key] for key in IMAGE_OPTIONS if config[key] is not None}
    if image:
        raise ValueError(f"Wan config {image} conditions on images (I2V/FLF2V); only text-to-video converts")
    if config["qk_norm"] not in WAN_QK_NORMS:
        raise ValueError(f"Wan config qk_norm={config['qk_norm']!r} is unknown; expected {WAN_QK_NORMS}")
    return dict(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"] or config["in_channels"],
        patch_size=list(config["patch_size"]),
        hidden_size=config["num_attention_heads"] * config["attention_head_dim"],
        num_layers=config["num_layers"],
        num_heads=config["num_attention_heads"],
        mlp_hidden_size=config["ffn_dim"],
        text_dim=config["text_dim"],
        pooled_dim=0,
        attention_layout="full",
        qk_norm=True,
        qk_norm_across_heads=True,
        cross_attn_norm=config["cross_attn_norm"],
        final_modulation="table",
        mask_text_padding=False,
        timestep_freq_dim=config["freq_dim"],
        rope_theta=10000.0,  # fixed in Wan
        rope_axes_dim=None,  # Wan's split of head_dim over (t, h, w) is our default
        rope_float64=True,
        eps=config["eps"],
        wan_precision=True,
    )


def config_to_wan(model: VideoDiT, rope_max_seq_len: int = WAN_DEFAULTS["rope_max_seq_len"]) -> dict:
    """`WanTransformer3DModel` arguments for a VideoDiT that Wan can express; refuses one it cannot.

    `rope_max_seq_len` bounds the latent frames, height and width (in patches) Wan accepts. `wan_precision`
    is not needed: Wan keeps its modules in float32 whatever this model did.
    """
    config = model.config
    needed = dict(
        attention_layout="full", pooled_dim=0, qk_norm=True, qk_norm_across_heads=True,
        final_modulation="table", mask_text_padding=False, rope_theta=10000.0,
    )  # fmt: skip
    differ = {key: config[key] for key, value in needed.items() if config[key] != value}
    if differ:
        raise ValueError(f"a Wan transformer has {needed}; this VideoDiT has {differ}")
    head_dim = config.hidden_size // config.num_heads
    if model.rope_axes_dim != default_rope_axes_dim(head_dim):
        raise ValueError(f"rope_axes_dim {model.rope_axes_dim} is not Wan's split of head_dim {head_dim}")
    return dict(
        patch_size=tuple(config.patch_size),
        num_attention_heads=config.num_heads,
        attention_head_dim=head_dim,
        in_channels=config.in_channels,
        out_channels=model.out_channels,
        text_dim=config.text_dim,
        freq_dim=config.timestep_freq_dim,
        ffn_dim=model.blocks[0].mlp[0].out_features,
        num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=config.eps,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=rope_max_seq_len,
        pos_embed_seq_len=None,
    )


# ----------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------


def tensor_pairs(num_layers: int, cross_attn_norm: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(our name, Wan names) for every tensor; where Wan has several, ours is their concatenation on dim 0."""

    def linear(ours: str, *wan: str) -> list[tuple[str, tuple[str, ...]]]:
        return [(f"{ours}.{p}", tuple(f"{name}.{p}" for name in wan)) for p in ("weight", "bias")]

    pairs = [
        *linear("patch_embed", "patch_embedding"),
        *linear("time_embed.0", "condition_embedder.time_embedder.linear_1"),
        *linear("time_embed.2", "condition_embedder.time_embedder.linear_2"),
        *linear("adaln.1", "condition_embedder.time_proj"),
        *linear("text_embed.0", "condition_embedder.text_embedder.linear_1"),
        *linear("text_embed.2", "condition_embedder.text_embedder.linear_2"),
        ("modulation_out", ("scale_shift_table",)),
        *linear("proj_out", "proj_out"),
    ]
    for i in range(num_layers):
        ours, wan = f"blocks.{i}.", f"blocks.{i}."
        pairs += [
            (ours + "modulation", (wan + "scale_shift_table",)),
            # 1. self-attention
            *linear(ours + "self_attns.0.to_qkv", wan + "attn1.to_q", wan + "attn1.to_k", wan + "attn1.to_v"),
            (ours + "self_attns.0.norm_q.weight", (wan + "attn1.norm_q.weight",)),
            (ours + "self_attns.0.norm_k.weight", (wan + "attn1.norm_k.weight",)),
            *linear(ours + "self_attns.0.to_out", wan + "attn1.to_out.0"),
            # 2. cross-attention
            *(linear(ours + "norm_cross", wan + "norm2") if cross_attn_norm else []),
            *linear(ours + "cross_attn.to_q", wan + "attn2.to_q"),
            *linear(ours + "cross_attn.to_kv", wan + "attn2.to_k", wan + "attn2.to_v"),
            (ours + "cross_attn.norm_q.weight", (wan + "attn2.norm_q.weight",)),
            (ours + "cross_attn.norm_k.weight", (wan + "attn2.norm_k.weight",)),
            *linear(ours + "cross_attn.to_out", wan + "attn2.to_out.0"),
            # 3. feed-forward
            *linear(ours + "mlp.0", wan + "ffn.net.0.proj"),
            *linear(ours + "mlp.2", wan + "ffn.net.2"),
        ]
    return pairs


def _layout(state_dict: Mapping[str, torch.Tensor], norm_key: str) -> tuple[int, bool]:
    """(number of blocks, whether blocks have a cross-attention norm) from a state dict's keys."""
    blocks = {int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"state dict has blocks {sorted(blocks)}; expected 0 to {len(blocks) - 1}")
    return len(blocks), f"blocks.0.{norm_key}.weight" in state_dict


def _check_keys(state_dict: Mapping[str, torch.Tensor], expected: set[str], whose: str) -> None:
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{whose} state dict does not match its layout: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]} ({len(missing)} and {len(unexpected)} in all)"
        )


def state_dict_from_wan(wan_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A `WanTransformer3DModel` state dict as VideoDiT's; one-to-one tensors are shared, not copied."""
    num_layers, cross_attn_norm = _layout(wan_state_dict, "norm2")
    pairs = tensor_pairs(num_layers, cross_attn_norm)
    _check_keys(wan_state_dict, {name for _, names in pairs for name in names}, "Wan")
    state = {}
    for ours, names in pairs:
        tensors = [wan_state_dict[name] for name in names]
        if ours == "patch_embed.weight":  # Conv3d kernel as a Linear over flattened (pt ph pw c) patches
            state[ours] = rearrange(tensors[0], "d c pt ph pw -> d (pt ph pw c)").contiguous()
        elif ours.endswith(("modulation", "modulation_out")):
            state[ours] = tensors[0].squeeze(0)  # (1, M, D) -> (M, D)
        else:
            state[ours] = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    return state


def state_dict_to_wan(state_dict: Mapping[str, torch.Tensor], patch_size: tuple[int, int, int]) -> StateDict:
    """A Wan-expressible VideoDiT's state dict as `WanTransformer3DModel`'s; inverse of `state_dict_from_wan`.

    Split tensors are copies, each with its own storage (as safetensors needs); the rest are shared.
    """
    num_layers, cross_attn_norm = _layout(state_dict, "norm_cross")
    pairs = tensor_pairs(num_layers, cross_attn_norm)
    _check_keys(state_dict, {ours for ours, _ in pairs}, "VideoDiT (Wan layout)")
    p_t, p_h, p_w = patch_size
    wan = {}
    for ours, names in pairs:
        tensor = state_dict[ours]
        if ours == "patch_embed.weight":
            kernel = rearrange(tensor, "d (pt ph pw c) -> d c pt ph pw", pt=p_t, ph=p_h, pw=p_w)
            wan[names[0]] = kernel.contiguous()
        elif ours.endswith(("modulation", "modulation_out")):
            wan[names[0]] = tensor.unsqueeze(0)  # (M, D) -> (1, M, D)
        elif len(names) > 1:
            wan.update(zip(names, (part.clone() for part in tensor.chunk(len(names)))))
        else:
            wan[names[0]] = tensor
    return wan


# ----------------------------------------------------------------------------------------------------
# Models and folders
# ----------------------------------------------------------------------------------------------------


def transformer_from_wan(
    wan: WanTransformer3DModel | str | os.PathLike, dtype: torch.dtype | None = None
) -> VideoDiT:
    """A VideoDiT equal to a Wan transformer: a loaded model (copied), a saved transformer folder, or a
    `WanPipeline` folder (its `transformer/`). Weights keep their stored dtype unless `dtype` is given, except those
    diffusers keeps in float32 (`WanTransformer3DModel._keep_in_fp32_modules`); a folder's are cast file by file as
    they are read, so a 14B model never exists twice."""
    keep_fp32 = WanTransformer3DModel._keep_in_fp32_modules
    if isinstance(wan, WanTransformer3DModel):
        config = dict(wan.config)
        state = {k: cast(k, v.detach(), dtype, keep_fp32).clone() for k, v in wan.state_dict().items()}
    else:
        config, state = read_model_folder(wan, WAN_CLASS, dtype, keep_fp32)
    return assemble(VideoDiT, config_from_wan(config), state_dict_from_wan(state))


def transformer_to_wan(
    model: VideoDiT | str | os.PathLike, rope_max_seq_len: int = WAN_DEFAULTS["rope_max_seq_len"]
) -> WanTransformer3DModel:
    """A `WanTransformer3DModel` equal to a Wan-expressible VideoDiT: a loaded model (copied), a saved
    VideoDiT folder, or a pipeline folder (its `transformer/`)."""
    if isinstance(model, VideoDiT):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        config, state = read_model_folder(model, "VideoDiT")
        with init_empty_weights():
            model = VideoDiT.from_config(config)
    wan_config = config_to_wan(model, rope_max_seq_len)
    return assemble(WanTransformer3DModel, wan_config, state_dict_to_wan(state, wan_config["patch_size"]))


def assemble(cls: type[nn.Module], config: dict, state_dict: StateDict) -> nn.Module:
    """`cls.from_config(config)` holding `state_dict`'s tensors themselves, in eval mode.

    Built with empty (meta) parameters, then assigned: no memory for a throwaway initialisation.
    """
    with init_empty_weights():
        model = cls.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None, keep_fp32: Sequence[str] = ()) -> torch.Tensor:
    """`tensor` in `dtype` (None: as it is); in float32 if `name` is in one of the modules `keep_fp32`."""
    if dtype is None or not tensor.is_floating_point():
        return tensor
    if in_fp32_modules(name, keep_fp32):
        return tensor.to(torch.float32)
    return tensor.to(dtype)


def read_model_folder(
    path: str | os.PathLike, class_name: str, dtype: torch.dtype | None = None, keep_fp32: Sequence[str] = ()
) -> tuple[dict, StateDict]:
    """Config and safetensors state dict of a saved `class_name`: its folder, or a pipeline folder holding it
    in `transformer/`. Sharded checkpoints (an index file) are read whole; each file is cast to `dtype` (if
    given) as it is read, but for the modules named in `keep_fp32`, cast to float32."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a folder")
    folder = path
    if os.path.isfile(os.path.join(path, "model_index.json")):
        folder = os.path.join(path, "transformer")
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path!r} holds no {class_name}: {config_file!r} does not exist")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("_class_name") != class_name:
        raise ValueError(f"{config_file!r} is for a {config.get('_class_name')}, not a {class_name}")

    single = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise ValueError(
            f"{folder!r} has neither {SAFETENSORS_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} "
            "(only safetensors weights are read)"
        )
    state = {}
    for file in files:
        state.update({name: cast(name, tensor, dtype, keep_fp32) for name, tensor in load_file(file).items()})
    return config, state

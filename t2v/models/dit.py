"""Spatial-temporal diffusion transformer (DiT) over video latents, trained by flow matching.

Read top to bottom: helpers (timestep embedding, 3D RoPE), attention modules, the block, the model.

- Tokens: non-overlapping 3D patches of the latent video (a Linear over each flattened patch), ordered
  (t h w). Positions enter only through 3D rotary embeddings computed for the actual grid, so one model
  serves any frame count and resolution.
- Conditioning: a sinusoidal timestep embedding plus (optionally) a projected pooled text vector give a
  vector `c`. One shared `SiLU -> Linear` maps `c` to modulation that each block offsets by its own
  learned table (adaLN-single, as PixArt-alpha and Wan). Both start at zero, so every block starts as the
  identity (adaLN-zero). Text tokens enter through cross-attention with a padding mask.
- Self-attention layouts: "full" attends over all T*H*W tokens (Wan, CogVideoX); "factorized" runs
  spatial attention within each frame, then temporal attention at each spatial position (Latte, STDiT),
  each with its own adaLN shift/scale/gate.
- The model predicts the flow-matching velocity (noise - x0) at timestep = sigma * 1000.
- Frame conditioning (`frame_conditioning=True`, off by default): given latent frames (the first for
  image-to-video, the first k to extend a clip) sit clean in the noisy sequence, as in LTX-Video and Wan 2.2
  TI2V, marked by a mask channel appended to the input (as Wan 2.1 I2V marks its own), which has its own
  zero-initialised patch embedding. That costs patch_volume * hidden_size parameters and no compute in the
  blocks; the timestep stays one per sample, so the shared modulation and sequence parallelism are unchanged
  (LTX's and Wan 2.2's per-token timesteps would make the modulation (B, N, M, D)). Concatenating masked
  clean latents as channels (Wan 2.1 I2V, CogVideoX-I2V) would double the input width and regenerate the
  given frames only approximately; here the sampler holds them (`t2v.flow.denoise`), so they come back
  exactly, and one model does text-to-video, image-to-video and extension by any k frames.
  `add_frame_conditioning` converts a trained unconditioned model exactly.
- Wan 2.1 (diffusers' `WanTransformer3DModel`) is this model with six switches, whose defaults keep ours:
  QK RMS-norm across all heads, a final modulation of c plus a learned table, text padding attended rather
  than masked, RoPE angles in float64, (optionally) no norm before cross-attention, and in bf16 the
  timestep embedder, modulation tables and cross-attention norm kept in float32. `t2v/models/wan.py`
  converts weights both ways.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from t2v.flow import patch_dims
from t2v.models.attention import BACKENDS, attention, check_backend

LAYOUTS = ("full", "factorized")
FINAL_MODULATIONS = ("projected", "table")
# Modules `wan_precision` keeps in float32 (the counterparts of Wan's `_keep_in_fp32_modules`), matched
# against each part of a parameter's dotted name as diffusers matches them.
FP32_MODULES = ("time_embed", "modulation", "modulation_out", "norm_cross")

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps. t: (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def default_rope_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of head_dim over (t, h, w): h = w = 2 * (head_dim // 6), t takes the rest."""
    hw = 2 * (head_dim // 6)
    return (head_dim - 2 * hw, hw, hw)


def rope_3d(
    grid: tuple[int, int, int],
    axes_dim: tuple[int, int, int],
    theta: float,
    device: torch.device,
    float64: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables for tokens ordered (t h w): each (T*H*W, head_dim // 2), float32.

    `float64` computes the angles in float64 before the cast, as Wan does (except on MPS, which has none).
    """
    dtype = torch.float64 if float64 and device.type != "mps" else torch.float32
    angles = []
    for axis, (size, dim) in enumerate(zip(grid, axes_dim)):
        exponents = torch.arange(0, dim, 2, dtype=dtype, device=device) / dim
        freqs = 1.0 / theta**exponents if float64 else theta**-exponents  # (dim/2,)
        angle = torch.outer(torch.arange(size, dtype=dtype, device=device), freqs)  # (size, dim/2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        angles.append(angle.view(shape).expand(*grid, dim // 2))
    angles = torch.cat(angles, dim=-1).flatten(0, 2)  # (T*H*W, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, heads, N, D) by the angles of cos/sin (N, D/2).

    Computed in float32; the result keeps x's dtype.
    """
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, heads, N, D/2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def modulate(x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: norm(x) * (1 + scale) + shift, computed in float32. x: (B, N, D); shift, scale: (B, 1, D)."""
    return (norm(x.float()) * (1 + scale.float()) + shift.float()).type_as(x)


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 with float32 weights; the result keeps x's dtype (diffusers' `FP32LayerNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """RMS norm of queries or keys (B, heads, N, head_dim): over each head's channels (weight of size
    head_dim), or with `across_heads` over all heads' channels together (weight of size heads * head_dim, as
    Wan). Computed in float32 and returned so, so that RoPE, which follows, needs no second conversion; the
    caller casts once. With `float32=False` computed in the weight's dtype instead, as Wan's `torch.nn.RMSNorm`
    computes in bf16 (the same in float32, and under autocast with float32 weights)."""

    def __init__(self, dim: int, eps: float, across_heads: bool = False, float32: bool = True):
        super().__init__()
        self.eps = eps
        self.across_heads = across_heads
        self.float32 = float32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if self.float32 else self.weight.dtype
        if not self.across_heads:
            return F.rms_norm(x.to(dtype), self.weight.shape, self.weight.to(dtype), self.eps)
        heads = x.shape[1]
        x = rearrange(x.to(dtype), "b h n d -> b n (h d)")
        out = F.rms_norm(x, self.weight.shape, self.weight.to(dtype), self.eps)  # (B, N, heads * head_dim)
        return rearrange(out, "b n (h d) -> b h n d", h=heads)


def qk_norm_layer(span: str | None, dim: int, num_heads: int, eps: float, float32: bool = True) -> nn.Module:
    """The query or key norm: RMS over each head ("per_head"), over all heads ("across_heads"), or none;
    computed in float32, or (`float32=False`) in the weight's dtype."""
    if span is None:
        return nn.Identity()
    across = span == "across_heads"
    return RMSNorm(dim if across else dim // num_heads, eps, across_heads=across, float32=float32)


def in_fp32_modules(name: str, modules: list[str]) -> bool:
    """Whether parameter `name` belongs to one of `modules`, matched as diffusers matches `_keep_in_fp32_modules`."""
    return any(module in name.split(".") for module in modules)


# ----------------------------------------------------------------------------------------------------
# Attention modules
# ----------------------------------------------------------------------------------------------------

# How each self-attention axis folds the (t s) token sequence (s = h * w) into independent sequences.
_FOLDS = {
    "spatial": ("b h (t s) d -> (b t) h s d", "(b t) h s d -> b h (t s) d"),
    "temporal": ("b h (t s) d -> (b s) h t d", "(b s) h t d -> b h (t s) d"),
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK RMS-norm and 3D RoPE.

    `axis` is "full" (all tokens), "spatial" (tokens of one frame) or "temporal" (tokens at one spatial
    position). RoPE is applied before folding, so every axis sees true 3D positions. The kernel call is
    `self.attention_fn(q, k, v, mask)`; a hook set by `VideoDiT.set_self_attention_hook` replaces it.
    """

    def __init__(
        self, dim: int, num_heads: int, qk_norm: str | None, eps: float, axis: str, backend: str,
        qk_norm_float32: bool = True,
    ):  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        self.axis = axis
        self.backend = backend
        # Kept out of the module tree: a hook owns no parameters to save.
        self.__dict__["attention_hook"] = None
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = qk_norm_layer(qk_norm, dim, num_heads, eps, qk_norm_float32)
        self.norm_k = qk_norm_layer(qk_norm, dim, num_heads, eps, qk_norm_float32)
        self.to_out = nn.Linear(dim, dim)

    def attention_fn(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.attention_hook is not None:
            return self.attention_hook(q, k, v, mask)
        return attention(q, k, v, mask, backend=self.backend)

    def forward(
        self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        # x: (B, N, D) with tokens ordered (t h w); rope_cos/sin: (N, head_dim/2)
        qkv = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q = apply_rope(self.norm_q(q), rope_cos, rope_sin).type_as(v)
        k = apply_rope(self.norm_k(k), rope_cos, rope_sin).type_as(v)
        if self.axis == "full":
            out = self.attention_fn(q, k, v, None)
        else:
            fold, unfold = _FOLDS[self.axis]
            frames, height, width = grid
            q, k, v = (rearrange(z, fold, t=frames) for z in (q, k, v))  # (B', heads, N', head_dim)
            out = self.attention_fn(q, k, v, None)
            out = rearrange(out, unfold, t=frames, s=height * width)  # (B, heads, N, head_dim)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Multi-head attention from video tokens to text tokens; tokens masked as padding are not attended."""

    def __init__(
        self, dim: int, num_heads: int, qk_norm: str | None, eps: float, backend: str, qk_norm_float32: bool = True
    ):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.norm_q = qk_norm_layer(qk_norm, dim, num_heads, eps, qk_norm_float32)
        self.norm_k = qk_norm_layer(qk_norm, dim, num_heads, eps, qk_norm_float32)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, N, D); context: (B, L, D); context_mask: (B, L) bool, True = real token, or None = all real
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)
        kv = rearrange(self.to_kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        k, v = kv.unbind(0)  # each (B, heads, L, head_dim)
        q, k = self.norm_q(q).type_as(v), self.norm_k(k).type_as(v)
        # A fully padded row attends to nothing; `attention` returns zeros for it, not NaN.
        # No mask when every token is real: SDPA may then pick its flash kernel.
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = attention(q, k, v, mask, backend=self.backend)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


# ----------------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------------


class VideoDiTBlock(nn.Module):
    """Self-attention (full, or spatial then temporal), cross-attention to text, MLP; adaLN-modulated.

    Modulation rows, 3 per adaLN group, in order: (shift, scale, gate) for each self-attention, then for
    the MLP. Cross-attention uses a plain affine LayerNorm (or, without `cross_attn_norm`, none) and no gate,
    as in PixArt-alpha and Wan.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_size: int,
        layout: str,
        qk_norm: str | None,
        cross_attn_norm: bool,
        eps: float,
        backend: str,
        wan_precision: bool = False,
    ):
        super().__init__()
        axes = ("full",) if layout == "full" else ("spatial", "temporal")
        self.num_modulations = 3 * (len(axes) + 1)
        # Per-block offset added to the shared timestep modulation (adaLN-single).
        self.modulation = nn.Parameter(torch.zeros(self.num_modulations, dim))
        self.norm_attn = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        # With `wan_precision`: QK norms in the weights' dtype and the cross-attention norm in float32, as Wan's.
        self.self_attns = nn.ModuleList(
            SelfAttention(dim, num_heads, qk_norm, eps, a, backend, not wan_precision) for a in axes
        )
        cross_norm = Float32LayerNorm if wan_precision else nn.LayerNorm
        self.norm_cross = cross_norm(dim, eps=eps) if cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, eps, backend, not wan_precision)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_hidden_size), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden_size, dim)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        modulation: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        grid: tuple[int, int, int],
    ) -> torch.Tensor:
        # The tokens are named `hidden_states`, as diffusers' block hooks (first-block cache) look them up.
        x = hidden_states
        # x: (B, N, D); modulation: (B, num_modulations, D) shared across blocks. The gates are fp32, so a
        # gated sum is fp32; it is kept in the tokens' dtype, which `forward_blocks` sets to the model's: an
        # fp32 residual stream for fp32 weights (autocast training), bf16 tokens for a model loaded in bf16.
        dtype = x.dtype
        mod = modulation.float() + self.modulation.float()  # (B, num_modulations, D)
        *attn_mods, mlp_mod = rearrange(mod, "b (g three) d -> g three b 1 d", three=3)

        # 1. self-attention: one full, or spatial then temporal, each with its own shift/scale/gate
        for attn, (shift, scale, gate) in zip(self.self_attns, attn_mods):
            x = (x + gate * attn(modulate(x, self.norm_attn, shift, scale), rope_cos, rope_sin, grid)).to(dtype)

        # 2. cross-attention to the text tokens
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)

        # 3. feed-forward
        shift, scale, gate = mlp_mod
        x = (x + gate * self.mlp(modulate(x, self.norm_mlp, shift, scale))).to(dtype)
        return x


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


class VideoDiT(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin):
    """Text-conditioned video DiT predicting the flow-matching velocity of latents (B, C, T, H, W).

    `forward` is factored for sequence parallelism: `prepare_tokens` (patchify + RoPE tables, the tensors
    to shard along the sequence), `embed_conditions`, `forward_blocks`, `final_layer`, `unpatchify`.

    Switches whose non-default values give Wan 2.1 (`t2v.models.wan.config_from_wan`):
    - `qk_norm_across_heads`: the QK RMS-norm spans all heads (weight of size hidden_size), not each head.
    - `cross_attn_norm`: an affine LayerNorm before cross-attention (Wan's configs may turn it off).
    - `final_modulation`: "projected" = final shift/scale from SiLU -> Linear of c (`adaln_out`); "table" =
      c plus a learned (2, D) table (`modulation_out`).
    - `mask_text_padding`: False attends to every text token, padding included, whatever the mask says.
    - `timestep_freq_dim`: width of the sinusoidal timestep embedding.
    - `rope_float64`: RoPE angles computed in float64 before the float32 cos/sin.
    - `wan_precision`: the timestep embedder, the modulation tables and the cross-attention norm
      (`FP32_MODULES`) stay float32 when the model is cast to a lower precision, as diffusers loads Wan (its
      `_keep_in_fp32_modules`), and compute in float32; the QK norms compute in their weights' dtype, as Wan's.
      In bf16 the model then computes what Wan computes.

    `frame_conditioning`: the input has one more channel after the latents, the given-frame mask (1 on
    latent frames given clean, 0 on frames to generate); build it with `frame_conditioned_input`.

    Step caching is diffusers' (`CacheMixin`), off by default: `enable_cache(FirstBlockCacheConfig(threshold))`
    skips the blocks after the first on a step whose first-block output moved by less than `threshold` (mean
    absolute change relative to the last computed step's), reusing that step's residual of the other blocks.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["VideoDiTBlock"]
    _repeated_blocks = ["VideoDiTBlock"]  # what diffusers' compile_repeated_blocks() compiles, one graph per shape

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int | None = None,
        patch_size: int | tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        num_layers: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mlp_hidden_size: int | None = None,
        text_dim: int = 4096,
        pooled_dim: int = 0,
        attention_layout: str = "full",
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        rope_axes_dim: tuple[int, int, int] | None = None,
        attention_backend: str = "sdpa",
        eps: float = 1e-6,
        qk_norm_across_heads: bool = False,
        cross_attn_norm: bool = True,
        final_modulation: str = "projected",
        mask_text_padding: bool = True,
        timestep_freq_dim: int = 256,
        rope_float64: bool = False,
        frame_conditioning: bool = False,
        wan_precision: bool = False,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        patch_size = patch_dims(patch_size)  # one int p means (1, p, p), as in CogVideoX's configs
        self.register_to_config(patch_size=patch_size)  # so every reader of the config gets (t, h, w)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("text_dim", text_dim),
                            ("timestep_freq_dim", timestep_freq_dim)):  # fmt: skip
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if len(patch_size) != 3 or not all(isinstance(p, int) and p > 0 for p in patch_size):
            raise ValueError(f"patch_size={patch_size} must be three positive integers (t, h, w)")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads
        axes_dim = default_rope_axes_dim(head_dim) if rope_axes_dim is None else tuple(rope_axes_dim)
        if len(axes_dim) != 3 or sum(axes_dim) != head_dim or any(d <= 0 or d % 2 for d in axes_dim):
            raise ValueError(
                f"rope_axes_dim {axes_dim} must be three positive even sizes summing to head_dim {head_dim} "
                f"(hidden_size {hidden_size} / num_heads {num_heads}) for 3D RoPE over (t, h, w)"
            )
        if mlp_hidden_size is None:
            if mlp_ratio <= 0:
                raise ValueError(f"mlp_ratio={mlp_ratio} must be positive")
            mlp_hidden_size = int(hidden_size * mlp_ratio)
        if not isinstance(mlp_hidden_size, int) or mlp_hidden_size <= 0:
            raise ValueError(f"mlp_hidden_size={mlp_hidden_size!r} must be a positive integer")
        if not isinstance(pooled_dim, int) or pooled_dim < 0:
            raise ValueError(
                f"pooled_dim={pooled_dim!r} must be a non-negative integer (0 = no pooled vector)"
            )
        if attention_layout not in LAYOUTS:
            raise ValueError(f"attention_layout {attention_layout!r} is unknown; choose one of {LAYOUTS}")
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend {attention_backend!r} is unknown; choose one of {BACKENDS}")
        if rope_theta <= 0:
            raise ValueError(f"rope_theta={rope_theta} must be positive")
        if timestep_freq_dim % 2:
            raise ValueError(f"timestep_freq_dim={timestep_freq_dim} must be even (cos and sin pairs)")
        if qk_norm_across_heads and not qk_norm:
            raise ValueError("qk_norm_across_heads=True needs qk_norm=True")
        if final_modulation not in FINAL_MODULATIONS:
            raise ValueError(f"final_modulation {final_modulation!r} is unknown; one of {FINAL_MODULATIONS}")
        if not isinstance(frame_conditioning, bool):
            raise ValueError(f"frame_conditioning={frame_conditioning!r} must be True or False")
        if not isinstance(wan_precision, bool):
            raise ValueError(f"wan_precision={wan_precision!r} must be True or False")

        self.out_channels = out_channels
        self.patch_size = patch_size
        self.rope_axes_dim = axes_dim
        # Per model, not per class: only a model with `wan_precision` keeps modules in float32 (`_apply`).
        # diffusers reads it to skip them in layerwise (fp8) casting and when reporting the model's dtype.
        self._keep_in_fp32_modules = list(FP32_MODULES) if wan_precision else None
        patch_volume = math.prod(patch_size)

        # Embedders: patches, the given-frame mask, timestep, pooled text vector, text tokens.
        self.patch_embed = nn.Linear(in_channels * patch_volume, hidden_size)
        self.frame_mask_embed = nn.Linear(patch_volume, hidden_size, bias=False) if frame_conditioning else None
        self.time_embed = nn.Sequential(
            nn.Linear(timestep_freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled_embed = (
            nn.Sequential(nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            if pooled_dim > 0
            else None
        )
        self.text_embed = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )

        qk_norm_span = ("across_heads" if qk_norm_across_heads else "per_head") if qk_norm else None
        self.blocks = nn.ModuleList(
            VideoDiTBlock(
                hidden_size,
                num_heads,
                mlp_hidden_size,
                attention_layout,
                qk_norm_span,
                cross_attn_norm,
                eps,
                attention_backend,
                wan_precision,
            )
            for _ in range(num_layers)
        )
        # Shared adaLN projection of the conditioning vector, offset per block by its own table.
        num_modulations = self.blocks[0].num_modulations
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_modulations * hidden_size))

        # Final layer: adaLN shift/scale (projected from c, or c plus a table), then a linear map to the patch
        # volume.
        self.norm_out = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)
        if final_modulation == "projected":
            self.adaln_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        else:
            self.modulation_out = nn.Parameter(torch.zeros(2, hidden_size))
        self.proj_out = nn.Linear(hidden_size, patch_volume * out_channels)

        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, except that a model with `wan_precision` keeps `FP32_MODULES` in float32
        whatever dtype is asked: it is read as stored, then cast (diffusers reads `_keep_in_fp32_modules` from
        the class, where it is None, before the config is known)."""
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype is None or dtype == torch.float32:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not cls.load_config(pretrained_model_name_or_path, **kwargs).get("wan_precision", False):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        as_stored = {key: value for key, value in kwargs.items() if key not in ("dtype", "torch_dtype")}
        return super().from_pretrained(pretrained_model_name_or_path, **as_stored).to(dtype)

    def _apply(self, fn, recurse=True):
        """`nn.Module._apply` (under `.to()`, `.bfloat16()`, `.half()`), except that with `wan_precision` a
        float32 parameter of `FP32_MODULES` that a cast would lower keeps its float32 values, on the new device."""
        if not self._keep_in_fp32_modules:
            return super()._apply(fn, recurse)
        kept = {name: p.data for name, p in self.named_parameters() if in_fp32_modules(name, self._keep_in_fp32_modules)
                and p.dtype == torch.float32}  # fmt: skip
        super()._apply(fn, recurse)
        for name, p in self.named_parameters():
            if name in kept and p.dtype != torch.float32:
                p.data = kept[name].to(p.device)
        return self

    def initialize_weights(self) -> None:
        # All linear layers (patch embedding included, a Linear over flattened patches): Xavier-uniform
        # weights and zero biases, as in DiT.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Timestep, pooled-text and text-token MLPs: small normal weights, as DiT's timestep embedder.
        embedders = [self.time_embed, self.text_embed] + ([self.pooled_embed] if self.pooled_embed else [])
        for embedder in embedders:
            for layer in embedder:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=0.02)
        # Given-frame mask embedding: zero, so a frame-conditioned model starts as the unconditioned one and
        # `add_frame_conditioning` keeps a trained model's output exactly.
        if self.frame_mask_embed is not None:
            nn.init.zeros_(self.frame_mask_embed.weight)
        # adaLN modulation (shared projection and per-block tables): zero, so shift = scale = gate = 0 and
        # each block's gated branches start switched off; the network starts as the identity (adaLN-zero).
        nn.init.zeros_(self.adaln[-1].weight)
        nn.init.zeros_(self.adaln[-1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
        # Final modulation and output projection: zero, so the initial velocity prediction is exactly zero.
        if self.config.final_modulation == "projected":
            nn.init.zeros_(self.adaln_out[-1].weight)
            nn.init.zeros_(self.adaln_out[-1].bias)
        else:
            nn.init.zeros_(self.modulation_out)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # -- attention backend and hook ------------------------------------------------------------------

    def set_attention_backend(self, name: str) -> None:
        """Use attention backend `name` ("sdpa" or "xformers") in every attention module."""
        check_backend(name)
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.backend = name
        self.register_to_config(attention_backend=name)

    def set_self_attention_hook(self, fn: AttentionFn | None) -> None:
        """Replace the kernel of every self-attention with `fn(q, k, v, mask) -> out`, all (B, heads, N, D).

        For sequence parallelism (e.g. Ulysses all-to-all around a local `attention` call). With the
        factorized layout the hook receives folded sequences: frames (spatial) or positions (temporal) as
        batch. `None` restores the configured backend.
        """
        if fn is not None and not callable(fn):
            raise ValueError(f"self-attention hook must be callable or None, got {type(fn).__name__}")
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.__dict__["attention_hook"] = fn

    # -- step caching --------------------------------------------------------------------------------

    def enable_cache(self, config) -> None:
        """diffusers' `CacheMixin.enable_cache` (e.g. `FirstBlockCacheConfig(threshold)`), with `VideoDiTBlock`
        made known to diffusers' block hooks: its output is the tokens alone, no text stream is returned."""
        from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

        TransformerBlockRegistry.register(VideoDiTBlock, TransformerBlockMetadata(return_hidden_states_index=None))
        super().enable_cache(config)

    # -- forward, factored ---------------------------------------------------------------------------

    def prepare_tokens(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Patchify latents (and the given-frame mask) and build RoPE tables for their grid.

        Returns tokens (B, N, D), rope_cos and rope_sin (N, head_dim/2) and grid (T', H', W'), N = T'H'W'.
        Tokens are ordered (t h w); a sequence-parallel wrapper shards tokens on dim 1 and RoPE on dim 0.
        """
        p_t, p_h, p_w = self.patch_size
        _, _, frames, height, width = hidden_states.shape
        grid = (frames // p_t, height // p_h, width // p_w)
        dtype = self.patch_embed.weight.dtype

        def patchify(x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, N, patch_volume * C)
            return rearrange(
                x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=p_t, ph=p_h, pw=p_w
            ).to(dtype)

        if self.frame_mask_embed is None:
            tokens = self.patch_embed(patchify(hidden_states))  # (B, N, D)
        else:
            latents, mask = hidden_states.split([self.config.in_channels, 1], dim=1)
            tokens = self.patch_embed(patchify(latents)) + self.frame_mask_embed(patchify(mask))  # (B, N, D)
        rope_cos, rope_sin = rope_3d(
            grid, self.rope_axes_dim, self.config.rope_theta, hidden_states.device, self.config.rope_float64
        )
        return tokens, rope_cos, rope_sin, grid

    def embed_conditions(
        self,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the conditioning vector c (B, D), shared block modulation (B, M, D), text tokens (B, L, D)."""
        dtype = self.patch_embed.weight.dtype
        frequencies = timestep_embedding(timestep, self.config.timestep_freq_dim)  # (B, timestep_freq_dim)
        time_dtype = self.time_embed[0].weight.dtype if self.config.wan_precision else dtype
        cond = self.time_embed(frequencies.to(time_dtype)).to(dtype)  # (B, D)
        if self.pooled_embed is not None:
            cond = cond + self.pooled_embed(pooled_projections.to(dtype))
        modulation = self.adaln(cond).unflatten(1, (-1, self.config.hidden_size))  # (B, M, D)
        context = self.text_embed(encoder_hidden_states.to(dtype))  # (B, L, D)
        return cond, modulation, context

    def forward_blocks(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        modulation: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        grid: tuple[int, int, int],
    ) -> torch.Tensor:
        """Run all blocks on tokens (B, N, D), with gradient checkpointing when enabled."""
        # The residual stream's dtype: the weights' (float32 under autocast, whatever the patch embedding gave).
        tokens = tokens.to(self.patch_embed.weight.dtype)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(
                    block, tokens, context, context_mask, modulation, rope_cos, rope_sin, grid
                )
            else:
                tokens = block(tokens, context, context_mask, modulation, rope_cos, rope_sin, grid)
        return tokens

    def final_layer(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """adaLN shift/scale and projection: (B, N, D) -> (B, N, patch_volume * out_channels)."""
        if self.config.final_modulation == "projected":
            shift, scale = self.adaln_out(cond).unsqueeze(1).chunk(2, dim=-1)  # each (B, 1, D)
        else:
            shift, scale = (self.modulation_out.float() + cond.float()[:, None]).chunk(2, dim=1)  # (B, 1, D)
        return self.proj_out(modulate(tokens, self.norm_out, shift, scale))

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, patch_volume * C) -> (B, C, T, H, W)."""
        p_t, p_h, p_w = self.patch_size
        frames, height, width = grid
        return rearrange(
            x,
            "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            t=frames, h=height, w=width, pt=p_t, ph=p_h, pw=p_w,
        )  # fmt: skip

    def _check_inputs(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        pooled_projections: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate inputs; return timestep (B,) float32 and the text mask (B, L) bool (None: attend to all).

        With `mask_text_padding=False` the mask is checked, then dropped: every text token is attended.
        """
        config = self.config
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be (B, C, T, H, W), got shape {tuple(hidden_states.shape)}")
        batch, channels, frames, height, width = hidden_states.shape
        if config.frame_conditioning and channels != config.in_channels + 1:
            raise ValueError(
                f"hidden_states has {channels} channels; this frame-conditioned model expects "
                f"{config.in_channels} latent channels plus the given-frame mask (see frame_conditioned_input)"
            )
        if not config.frame_conditioning and channels != config.in_channels:
            raise ValueError(f"hidden_states has {channels} channels, the model expects {config.in_channels}")
        if any(size % p for size, p in zip((frames, height, width), self.patch_size)):
            raise ValueError(
                f"latent size (T, H, W) = {(frames, height, width)} is not divisible by patch_size {self.patch_size}"
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states must be (B={batch}, L, {config.text_dim}), "
                f"got shape {tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[2] != config.text_dim:
            raise ValueError(
                f"encoder_hidden_states has dim {encoder_hidden_states.shape[2]}, the model expects {config.text_dim}"
            )
        length = encoder_hidden_states.shape[1]

        timestep = torch.as_tensor(timestep, device=hidden_states.device, dtype=torch.float32)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if tuple(timestep.shape) != (batch,):
            raise ValueError(
                f"timestep must be a scalar or shaped (B={batch},), got shape {tuple(timestep.shape)}"
            )

        if encoder_attention_mask is None:
            mask = None  # every text token is real
        else:
            if tuple(encoder_attention_mask.shape) != (batch, length):
                raise ValueError(
                    f"encoder_attention_mask must be (B={batch}, L={length}), "
                    f"got shape {tuple(encoder_attention_mask.shape)}"
                )
            mask = (
                encoder_attention_mask
                if encoder_attention_mask.dtype == torch.bool
                else encoder_attention_mask != 0
            )

        if config.pooled_dim > 0:
            if pooled_projections is None:
                raise ValueError(
                    f"pooled_projections (B, {config.pooled_dim}) is required: pooled_dim={config.pooled_dim}"
                )
            if tuple(pooled_projections.shape) != (batch, config.pooled_dim):
                raise ValueError(
                    f"pooled_projections must be (B={batch}, {config.pooled_dim}), "
                    f"got shape {tuple(pooled_projections.shape)}"
                )
        elif pooled_projections is not None:
            raise ValueError(
                "pooled_projections given but the model has pooled_dim=0 (no pooled text vector)"
            )
        if not config.mask_text_padding:
            mask = None  # padding is attended like any other token
        return timestep, mask

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the velocity (noise - x0) for latents (B, C, T, H, W) at timestep = sigma * 1000 (B,).

        With `frame_conditioning` hidden_states is (B, C + 1, T, H, W): latents, then the given-frame mask.

        encoder_hidden_states: (B, L, text_dim); encoder_attention_mask: (B, L), True / nonzero = real token
        (None = all real); pooled_projections: (B, pooled_dim), required iff pooled_dim > 0.
        """
        timestep, context_mask = self._check_inputs(
            hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections
        )
        # 1. tokens and their RoPE tables
        tokens, rope_cos, rope_sin, grid = self.prepare_tokens(hidden_states)  # (B, N, D)
        # 2. conditioning: timestep (+ pooled text) vector, shared modulation, text tokens
        cond, modulation, context = self.embed_conditions(timestep, encoder_hidden_states, pooled_projections)
        # 3. transformer blocks (with a step cache, one cache state serves every call of a sampling run: the
        # pipeline resets it at the end of each run)
        with self.cache_context("denoise") if self.is_cache_enabled else contextlib.nullcontext():
            tokens = self.forward_blocks(tokens, context, context_mask, modulation, rope_cos, rope_sin, grid)
        # 4. final layer and unpatchify
        out = self.unpatchify(self.final_layer(tokens, cond), grid)  # (B, C_out, T, H, W)
        out = out.to(hidden_states.dtype)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


# ----------------------------------------------------------------------------------------------------
# Frame conditioning
# ----------------------------------------------------------------------------------------------------


def frame_conditioned_input(latents: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """The input of a frame-conditioned `VideoDiT`: latents (B, C, T, H, W), given frames clean, then the mask.

    frame_mask: bool (B, 1, T, 1, 1) or (B, 1, T, H, W), True on given latent frames (`t2v.flow.first_frames_mask`).
    Returns (B, C + 1, T, H, W).
    """
    batch, _, frames, height, width = latents.shape
    mask = frame_mask.to(latents.dtype).expand(batch, 1, frames, height, width)
    return torch.cat([latents, mask], dim=1)


def add_frame_conditioning(model: VideoDiT) -> VideoDiT:
    """A frame-conditioned copy of an unconditioned `model`: its weights plus a zero mask embedding.

    The copy computes exactly what `model` computes, whatever the mask says, until training moves the mask
    embedding; so a trained text-to-video model (the shipped default included) can be fine-tuned into one
    that also animates an image and extends a clip. Same device and dtype as `model`.
    """
    if model.config.frame_conditioning:
        raise ValueError("the model already has frame_conditioning=True")
    # Constructor arguments only: a loaded config's `_use_default_values` would reset frame_conditioning.
    config = {key: value for key, value in model.config.items() if not key.startswith("_")}
    with torch.random.fork_rng(devices=[]):  # the discarded initialisation leaves the caller's RNG alone
        conditioned = VideoDiT.from_config({**config, "frame_conditioning": True})
    missing, unexpected = conditioned.load_state_dict(model.state_dict(), strict=False)
    if missing != ["frame_mask_embed.weight"] or unexpected:
        raise ValueError(f"cannot convert this model: missing {missing}, unexpected {unexpected}")
    return conditioned.to(device=model.device, dtype=model.dtype)

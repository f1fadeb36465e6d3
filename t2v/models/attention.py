"""Attention backends: the single place where the attention kernel is chosen.

`attention(q, k, v, mask, backend)` takes and returns (B, heads, N, head_dim) tensors. Backends:
- "sdpa": `torch.nn.functional.scaled_dot_product_attention` (any device, any dtype).
- "xformers": `xformers.ops.memory_efficient_attention` (CUDA only; needs the optional xformers package).

A boolean mask, broadcastable to (B, heads, N_q, N_kv), marks with True the keys a query may attend to.
A query whose mask row is all False gets a zero output instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional dependency, absent on CPU-only installs
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the environment
    xops = None

BACKENDS = ("sdpa", "xformers")


def xformers_available() -> bool:
    return xops is not None


def check_backend(backend: str, device: torch.device | None = None) -> None:
    """Raise ValueError if `backend` is unknown, or cannot run here (xformers missing or not on CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {BACKENDS}")
    if backend == "xformers":
        if xops is None:
            raise ValueError(
                "attention backend 'xformers' requested but xformers is not installed; "
                "install it (pip install xformers, CUDA only) or use backend='sdpa'"
            )
        if device is not None and device.type != "cuda":
            raise ValueError(f"attention backend 'xformers' runs on CUDA only, got tensors on {device}")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    batch, heads, n_q, _ = q.shape
    n_kv = k.shape[2]
    bias = None
    if mask is not None:
        # xformers wants an additive bias whose last-dim storage is a multiple of 8.
        padded = (n_kv + 7) // 8 * 8
        bias = q.new_zeros(batch, heads, n_q, padded)[..., :n_kv]
        bias.masked_fill_(~mask.expand(batch, heads, n_q, n_kv), float("-inf"))
    # xformers layout is (B, N, heads, head_dim)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, heads, N_q, D), k/v: (B, heads, N_kv, D) -> (B, heads, N_q, D).

    `mask` is a bool tensor broadcastable to (B, heads, N_q, N_kv), True = may attend.
    """
    check_backend(backend, q.device)
    has_key = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"attention mask must be a bool tensor, got dtype {mask.dtype}")
        # Rows with no key to attend to would be NaN: let them attend everywhere, then zero them.
        has_key = mask.any(dim=-1, keepdim=True)  # broadcastable to (B, heads, N_q, 1)
        mask = mask | ~has_key
        if mask.shape[-2] == 1:  # a key-padding mask, one row for all queries: zero the values instead of
            v = v * has_key.to(v.dtype)  # the output (N_kv x D per head rather than N_q x D)
            has_key = None
    fn = _sdpa if backend == "sdpa" else _xformers
    out = fn(q, k, v, mask)
    if has_key is not None:
        out = out * has_key.to(out.dtype)
    return out

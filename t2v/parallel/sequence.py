"""Ulysses sequence parallelism for `VideoDiT`, applied from outside the model.

Each of P ranks in a group holds N/P of the video tokens. Around every self-attention an all-to-all
trades the token shard for a head shard, attention runs on the whole sequence for H/P heads, and a
second all-to-all trades back (DeepSpeed-Ulysses). The model enters through its declared pieces:
`set_self_attention_hook` for the kernel, `prepare_tokens` for the token sequence and RoPE tables.

    model = SequenceParallelDiT(dit, group)        # shards tokens, installs the hook, gathers the output
    velocity = model(latents, timestep, text_states, text_mask, pooled).sample
    with model.detached():                         # the plain model, e.g. for validation on one rank
        ...

In training, `t2v.parallel.distributed.parallelize` applies it for `distributed.sequence_parallel_size` > 1.

Limits: attention_layout "full" only (a factorized layout folds frames with the global grid); no
attention mask in self-attention; N and the head count must be divisible by P. Parameter gradients on
a rank hold its tokens' share: sum them over the group (all-reduce SUM) before the optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from einops import rearrange
from torch import nn

from t2v.models.attention import attention


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """Block all-to-all on (P, ...) tensors: out[j] = rank j's x[my rank]."""
    x = x.contiguous()
    out = torch.empty_like(x)  # like a contiguous x: the collective writes flat blocks
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """The block all-to-all is a permutation of blocks that is its own adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group), None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, N/P, D) token shard -> (B, H/P, N, D) head shard."""
    size = dist.get_world_size(group)
    blocks = rearrange(x, "b (p h) n d -> p b h n d", p=size)  # block j: heads for rank j
    return rearrange(_AllToAll.apply(blocks, group), "p b h n d -> b h (p n) d")


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H/P, N, D) head shard -> (B, H, N/P, D) token shard."""
    size = dist.get_world_size(group)
    blocks = rearrange(x, "b h (p n) d -> p b h n d", p=size)  # block j: tokens of rank j
    return rearrange(_AllToAll.apply(blocks, group), "p b h n d -> b (p h) n d")


def ulysses_attention(group=None, backend: str = "sdpa"):
    """A self-attention hook `fn(q, k, v, mask)` for q, k, v token shards (B, H, N/P, D) -> (B, H, N/P, D)."""
    size = dist.get_world_size(group)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("ulysses_attention takes no self-attention mask (mask must be None)")
        if q.shape[1] % size:
            raise ValueError(f"{q.shape[1]} attention heads are not divisible by the sequence-parallel size {size}")
        q, k, v = (seq_to_heads(t, group) for t in (q, k, v))  # (B, H/P, N, D)
        return heads_to_seq(attention(q, k, v, None, backend=backend), group)  # (B, H, N/P, D)

    return fn


class _GatherSeq(torch.autograd.Function):
    """All-gather token shards along dim 1; backward keeps this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


class SequenceParallelDiT(nn.Module):
    """`VideoDiT` with its token sequence sharded over `group`; same inputs and output as the model.

    Conditioning and text are replicated; tokens, RoPE tables and self-attention are sharded; the
    final tokens are gathered before unpatchify, so every rank returns the whole velocity.
    """

    def __init__(self, model: nn.Module, group=None):
        super().__init__()
        if not hasattr(model, "set_self_attention_hook"):
            raise ValueError(f"sequence parallelism needs a VideoDiT (a model with a self-attention hook), got "
                             f"{type(model).__name__}")
        if model.config.attention_layout != "full":
            raise ValueError(f"sequence parallelism needs attention_layout='full', got "
                             f"{model.config.attention_layout!r}")
        size = dist.get_world_size(group)
        if model.config.num_heads % size:
            raise ValueError(f"num_heads={model.config.num_heads} is not divisible by the sequence-parallel "
                             f"size {size}")
        self.model, self.group, self.size, self.rank = model, group, size, dist.get_rank(group)
        self.hook = ulysses_attention(group, model.config.attention_backend)
        model.set_self_attention_hook(self.hook)

    @contextlib.contextmanager
    def detached(self):
        """The plain single-device model inside the block (hook removed), e.g. for validation on one rank."""
        self.model.set_self_attention_hook(None)
        try:
            yield self.model
        finally:
            self.model.set_self_attention_hook(self.hook)

    def close(self) -> None:
        """Remove the hook for good: the model is single-device again."""
        self.model.set_self_attention_hook(None)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None,
                pooled_projections=None, return_dict: bool = True):
        model = self.model
        timestep, context_mask = model._check_inputs(
            hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections
        )
        # 1. tokens and RoPE tables, this rank's contiguous slice of the (t h w) sequence
        tokens, rope_cos, rope_sin, grid = model.prepare_tokens(hidden_states)  # (B, N, D), (N, head_dim/2)
        n = tokens.shape[1]
        if n % self.size:
            raise ValueError(f"{n} tokens (latents {tuple(hidden_states.shape)}) are not divisible by the "
                             f"sequence-parallel size {self.size}")
        part = slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)
        tokens, rope_cos, rope_sin = tokens[:, part], rope_cos[part], rope_sin[part]  # (B, N/P, D)
        # 2. conditioning, replicated
        cond, modulation, context = model.embed_conditions(timestep, encoder_hidden_states, pooled_projections)
        # 3. blocks on the shard (self-attention exchanges through the hook)
        tokens = model.forward_blocks(tokens, context, context_mask, modulation, rope_cos, rope_sin, grid)
        # 4. final layer on the shard, gather, unpatchify
        out = _GatherSeq.apply(model.final_layer(tokens, cond), self.group)  # (B, N, patch_volume * C)
        out = model.unpatchify(out, grid).to(hidden_states.dtype)  # (B, C_out, T, H, W)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

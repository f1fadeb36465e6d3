"""Flow-matching maths shared by training and sampling: x_t = (1 - sigma) x0 + sigma eps, velocity eps - x0.

Small pure functions, so each piece can be checked by hand: sigmas and their shift, the token count the
shift follows, the training loss, given frames (held clean in training and sampling) and an Euler sampler.
The model sees timestep = sigma * 1000.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def sample_logit_normal(
    batch_size: int, mean: float, std: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """sigma = sigmoid(N(mean, std^2)), one per sample: (B,) in (0, 1), fp32."""
    normal = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * normal)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = shift * s / (1 + (shift - 1) * s); shift > 1 moves mass towards noise."""
    if shift <= 0:
        raise ValueError(f"shift {shift} must be > 0")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def patch_dims(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    """(p_t, p_h, p_w) of a patch size given as three ints, or as one int p: (1, p, p), the convention of
    diffusers' transformers whose patches are spatial (CogVideoX, Hunyuan Video: their `patch_size`)."""
    if isinstance(patch_size, int):
        return 1, patch_size, patch_size
    dims = tuple(patch_size)
    if len(dims) != 3:
        raise ValueError(f"patch_size={patch_size} must be one int (spatial) or three (t, h, w)")
    return dims


def num_tokens(latent_size: tuple[int, int, int], patch_size: int | Sequence[int]) -> int:
    """Transformer tokens of latents (T, H, W) cut into (p_t, p_h, p_w) patches (or (1, p, p) for an int p): the
    count the shift follows."""
    (frames, height, width), (p_t, p_h, p_w) = latent_size, patch_dims(patch_size)
    return (frames // p_t) * (height // p_h) * (width // p_w)


def shift_mu(
    seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """mu = log(shift), linear in the token count through (base_seq_len, base_shift), (max_seq_len, max_shift).

    Flux/SD3's `calculate_shift`: longer or larger videos get a larger shift. Samplers with dynamic shifting
    take `mu` itself (diffusers' `set_timesteps(mu=...)`); training shifts its sigmas by `dynamic_shift`.
    """
    if max_seq_len <= base_seq_len:
        raise ValueError(f"max_seq_len {max_seq_len} must exceed base_seq_len {base_seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def dynamic_shift(
    seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """exp(shift_mu): the `shift_sigmas` shift equal to a dynamic-shifting sampler's schedule at `mu`."""
    return math.exp(shift_mu(seq_len, base_seq_len, max_seq_len, base_shift, max_shift))


def flow_shift(num_tokens: int, flow) -> float:
    """The sigma shift of a `FlowConfig` for `num_tokens` latent tokens: dynamic, or the fixed `flow.shift`.

    Training shifts by it; `t2v.train.export.flow_scheduler` gives the sampler the same rule.
    """
    if flow.dynamic_shift:
        return dynamic_shift(num_tokens, flow.base_seq_len, flow.max_seq_len, flow.base_shift, flow.max_shift)
    return flow.shift


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target): x_t = (1 - sigma) x0 + sigma noise, target = noise - x0; sigmas (B,) broadcast."""
    sigma = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)  # (B, 1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise
    return x_t, noise - x0


def flow_matching_loss(
    model_fn: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    pooled_projections: torch.Tensor | None = None,
    *,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE (in fp32) between the predicted and true velocity at a logit-normal, shifted sigma.

    `model_fn(x_t, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections)` returns
    the velocity (B, C, T, H, W); x0 are normalised clean latents (B, C, T, H, W).

    frame_mask (bool, (B, 1, T, 1, 1)): latent frames given clean. x_t holds x0 there (a frame-conditioned
    `model_fn` adds the mask to its input), and the mean runs over the other frames only: the sampler never
    uses the velocity of a given frame, and there x_t = x0 shows no trace of the noise in its target.
    """
    sigmas = shift_sigmas(sample_logit_normal(x0.shape[0], logit_mean, logit_std, generator, x0.device), shift)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t, target = interpolate(x0, noise, sigmas)
    if frame_mask is None:
        prediction = model_fn(x_t, sigmas * 1000, encoder_hidden_states, encoder_attention_mask, pooled_projections)
        return F.mse_loss(prediction.float(), target.float())
    x_t = impose_frames(x_t, x0, frame_mask)
    prediction = model_fn(x_t, sigmas * 1000, encoder_hidden_states, encoder_attention_mask, pooled_projections)
    generate = (~frame_mask).expand(target.shape)  # (B, C, T, H, W): the frames to generate
    error = (prediction.float() - target.float()).square().masked_fill(~generate, 0.0)
    return error.sum() / generate.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------
# Given frames (image-to-video, extension) and sampling
# ----------------------------------------------------------------------------------------------------


def first_frames_mask(num_given: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, 1, T, 1, 1) bool, True on the first num_given[b] latent frames of sample b. num_given: (B,) ints."""
    return (torch.arange(frames, device=num_given.device) < num_given[:, None]).view(-1, 1, frames, 1, 1)


def impose_frames(latents: torch.Tensor, given: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """latents with the frames where frame_mask is True taken from `given` (both (B, C, T, H, W))."""
    return torch.where(frame_mask, given.to(latents.dtype), latents)


def denoise(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    given: torch.Tensor | None = None,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euler steps of dx/dsigma = velocity from sigmas[0] to sigmas[-1]; the core loop of a sampler.

    `velocity_fn(x, sigma)` returns the velocity (B, C, T, H, W) at the scalar tensor sigma (the model sees
    timestep = sigma * 1000). latents: the starting noise. With `given` and `frame_mask` the frames where the
    mask is True are held at `given` before every step and in the result, as in training.
    """
    if (given is None) != (frame_mask is None):
        raise ValueError("denoise needs both `given` and `frame_mask`, or neither")
    hold = (lambda x: x) if frame_mask is None else (lambda x: impose_frames(x, given, frame_mask))
    x = hold(latents)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = hold(x + (sigma_next - sigma) * velocity_fn(x, sigma))
    return x

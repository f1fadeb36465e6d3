"""Which latent frames a training sample is given: none (text-to-video), the first (image-to-video) or the
first k (extension). One pure function, drawing from the training loop's generator."""

from __future__ import annotations

import torch

from t2v.config import ConditionFramesConfig


def sample_given_frames(
    batch_size: int, latent_frames: int, cfg: ConditionFramesConfig, generator: torch.Generator
) -> torch.Tensor:
    """(B,) int64 on the generator's device: how many leading latent frames each sample is given.

    1 with probability `cfg.image_prob`, k uniform in [extend_min, extend_max] with `cfg.extend_prob`, else 0;
    at most latent_frames - 1, so a frame is always left to generate (a still image, one latent frame, is
    never given). Draws two (B,) tensors whatever the outcome, or nothing when conditioning is off.
    """
    device = generator.device
    if not cfg.enabled:
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    choice = torch.rand(batch_size, generator=generator, device=device)
    extend = torch.randint(cfg.extend_min, cfg.extend_max + 1, (batch_size,), generator=generator, device=device)
    given = torch.where(choice < cfg.image_prob, 1, torch.where(choice < cfg.image_prob + cfg.extend_prob, extend, 0))
    return given.clamp_max(latent_frames - 1)

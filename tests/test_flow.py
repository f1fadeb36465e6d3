import math

import pytest
import torch

from t2v.config import FlowConfig
from t2v.flow import (
    dynamic_shift,
    flow_matching_loss,
    flow_shift,
    interpolate,
    num_tokens,
    sample_logit_normal,
    shift_mu,
    shift_sigmas,
)


def test_shift_formula_by_hand():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # shift 3: 3s / (1 + 2s) -> 0, 0.75/1.5, 1.5/2, 1
    assert torch.allclose(shift_sigmas(sigmas, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_sigmas(sigmas, 1.0), sigmas)
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(sigmas, 0.0)


def test_dynamic_shift_is_linear_in_log_space():
    assert dynamic_shift(256, 256, 4096, 0.5, 1.15) == pytest.approx(math.exp(0.5))
    assert dynamic_shift(4096, 256, 4096, 0.5, 1.15) == pytest.approx(math.exp(1.15))
    assert dynamic_shift(2176, 256, 4096, 0.5, 1.15) == pytest.approx(math.exp(0.825))
    with pytest.raises(ValueError, match="max_seq_len"):
        dynamic_shift(10, 256, 256)


def test_token_count_and_the_shift_rule_by_hand():
    # The default Shapes World latents (5, 16, 16) in (1, 2, 2) patches: 5 * 8 * 8 tokens.
    assert num_tokens((5, 16, 16), (1, 2, 2)) == 320
    assert num_tokens((3, 4, 6), (1, 2, 3)) == 3 * 2 * 2
    assert shift_mu(256, 256, 4096, 0.5, 1.15) == 0.5 and shift_mu(2176, 256, 4096, 0.5, 1.15) == pytest.approx(0.825)
    assert dynamic_shift(320) == math.exp(shift_mu(320))  # the shift is exactly exp of the sampler's mu
    assert flow_shift(320, FlowConfig()) == dynamic_shift(320, 256, 4096, 0.5, 1.15)
    assert flow_shift(320, FlowConfig(dynamic_shift=False, shift=3.0)) == 3.0


def test_logit_normal_sigmas_are_seeded_and_in_range():
    a = sample_logit_normal(1000, 0.0, 1.0, torch.Generator().manual_seed(0))
    b = sample_logit_normal(1000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and ((a > 0) & (a < 1)).all()
    assert abs(a.median().item() - 0.5) < 0.05  # sigmoid(N(0, 1)) has median 0.5
    shifted = sample_logit_normal(1000, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert shifted.median() > 0.65  # sigmoid(1) = 0.73


def test_interpolate_by_hand():
    x0 = torch.tensor([2.0, 4.0]).view(2, 1, 1, 1, 1)
    noise = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1)
    x_t, target = interpolate(x0, noise, torch.tensor([0.25, 1.0]))
    # 0.75 * 2 + 0.25 * -1 = 1.25; 0 * 4 + 1 * 1 = 1
    assert torch.allclose(x_t.flatten(), torch.tensor([1.25, 1.0]))
    assert torch.allclose(target.flatten(), torch.tensor([-3.0, -3.0]))


def test_loss_zero_for_the_true_velocity_and_timestep_scale():
    x0 = torch.randn(3, 4, 2, 4, 4)
    seen = {}

    def oracle(x_t, timestep, states, mask, pooled):
        seen["timestep"] = timestep
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        # x_t = x0 + sigma (eps - x0) -> eps - x0 = (x_t - x0) / sigma
        return (x_t - x0) / sigma

    loss = flow_matching_loss(oracle, x0, torch.zeros(3, 5, 8), shift=3.0, generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-8
    assert seen["timestep"].shape == (3,) and ((seen["timestep"] > 0) & (seen["timestep"] < 1000)).all()


def test_loss_of_zero_prediction_matches_the_target_norm():
    x0 = torch.randn(2, 4, 2, 4, 4)

    def zero(x_t, timestep, states, mask, pooled):
        return torch.zeros_like(x_t)

    loss = flow_matching_loss(zero, x0, torch.zeros(2, 5, 8), generator=torch.Generator().manual_seed(2))
    # Rebuild the same draws: sigmas first, then the noise.
    generator = torch.Generator().manual_seed(2)
    sample_logit_normal(2, 0.0, 1.0, generator)
    noise = torch.randn(x0.shape, generator=generator)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(((noise - x0) ** 2).mean().item(), rel=1e-6)


def test_hard_pixel_error_takes_the_worst_pixels():
    import torch

    from t2v.train.vae_task import hard_pixel_error

    x = torch.zeros(2, 3, 1, 4, 5)  # 20 pixels per sample; fraction 0.05 keeps the single worst one
    recon = x.clone()
    recon[0, 0, 0, 0, 0] = 2.0  # sample 0: worst pixel error 2 (one channel)
    recon[1, :, 0, 1, 1] = 1.0  # sample 1: worst pixel error 3 (summed over channels)
    assert hard_pixel_error(recon, x, 0.05).item() == 2.5
    assert abs(hard_pixel_error(recon, x, 1.0).item() - (2.0 / 20 + 3.0 / 20) / 2) < 1e-6

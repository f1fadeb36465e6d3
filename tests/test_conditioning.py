"""Frame conditioning (image-to-video, extension): the model option, its exact conversion, the flow pieces,
the training sampler, training from every source, and a tiny train-then-sample run (CPU, tiny models)."""

import pytest
import torch
from helpers import preset, tiny_dit, tiny_vae
from omegaconf import OmegaConf
from safetensors.torch import load_file

import t2v
from t2v.config import ConditionFramesConfig, load_config
from t2v.flow import (
    denoise,
    first_frames_mask,
    flow_matching_loss,
    impose_frames,
    interpolate,
    sample_logit_normal,
    shift_sigmas,
)
from t2v.models.dit import VideoDiT, add_frame_conditioning, frame_conditioned_input
from t2v.train.conditioning import sample_given_frames

DEBUG = "configs/train/debug.yaml"


def dit_inputs(model, batch=2, frames=4, height=4, width=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    return dict(
        hidden_states=torch.randn(batch, config.in_channels, frames, height, width, generator=gen),
        timestep=torch.rand(batch, generator=gen) * 1000,
        encoder_hidden_states=torch.randn(batch, 6, config.text_dim, generator=gen),
        pooled_projections=torch.randn(batch, config.pooled_dim, generator=gen),
    )


def with_mask(kwargs, frame_mask):
    return {**kwargs, "hidden_states": frame_conditioned_input(kwargs["hidden_states"], frame_mask)}


# ----------------------------------------------------------------------------------------------------
# The model option and the conversion
# ----------------------------------------------------------------------------------------------------


def test_off_by_default_and_the_shipped_model_converts_exactly():
    """Unconditioned models keep their parameters; the converted shipped model reproduces the pinned output."""
    assert VideoDiT(hidden_size=24, num_layers=1, num_heads=2, text_dim=8).config.frame_conditioning is False
    assert not any("frame_mask" in name for name in tiny_dit().state_dict())

    model = VideoDiT.from_pretrained(t2v.DEFAULT_MODEL, subfolder="transformer", torch_dtype=torch.float32)
    assert model.config.frame_conditioning is False and model.frame_mask_embed is None
    fixture = load_file("tests/fixtures/shipped_transformer_output.safetensors")
    latents = fixture["latents"]
    conditioned = add_frame_conditioning(model)
    given = first_frames_mask(torch.tensor([1] * latents.shape[0]), latents.shape[2])
    with torch.no_grad():
        out = model(latents, fixture["timestep"], fixture["text"], fixture["mask"], fixture["pooled"]).sample
        conditioned_out = conditioned(frame_conditioned_input(latents, given), fixture["timestep"], fixture["text"],
                                      fixture["mask"], fixture["pooled"]).sample  # fmt: skip
    assert torch.equal(conditioned_out, out)
    torch.testing.assert_close(conditioned_out, fixture["output"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout,patch_size", [("full", (1, 2, 2)), ("factorized", (1, 2, 2)), ("full", (2, 2, 2))])
def test_add_frame_conditioning_computes_exactly_the_unconditioned_model(layout, patch_size):
    model = tiny_dit(attention_layout=layout, patch_size=patch_size)
    kwargs = dit_inputs(model)
    rng_state = torch.get_rng_state()
    conditioned = add_frame_conditioning(model)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the discarded initialisation drew nothing of ours
    assert conditioned.config.frame_conditioning and conditioned.dtype == model.dtype
    extra = set(conditioned.state_dict()) - set(model.state_dict())
    assert extra == {"frame_mask_embed.weight"} and not conditioned.frame_mask_embed.weight.any()
    with torch.no_grad():
        expected = model(**kwargs).sample
        for given in ([0, 0], [1, 0], [2, 3]):
            frame_mask = first_frames_mask(torch.tensor(given), 4)
            assert torch.equal(conditioned(**with_mask(kwargs, frame_mask)).sample, expected)
        # Once the mask embedding moves, the mask matters.
        conditioned.frame_mask_embed.weight.normal_()
        plain = conditioned(**with_mask(kwargs, first_frames_mask(torch.tensor([0, 0]), 4))).sample
        given = conditioned(**with_mask(kwargs, first_frames_mask(torch.tensor([2, 2]), 4))).sample
    assert not torch.allclose(plain, given)
    with pytest.raises(ValueError, match="already has frame_conditioning"):
        add_frame_conditioning(conditioned)


def test_bf16_conversion_keeps_the_dtype_and_the_weights():
    model = tiny_dit().to(torch.bfloat16)
    conditioned = add_frame_conditioning(model)
    assert conditioned.dtype == torch.bfloat16
    for name, value in model.state_dict().items():
        assert torch.equal(conditioned.state_dict()[name], value), name


def test_conditioned_model_checks_its_input_channels():
    conditioned = tiny_dit(frame_conditioning=True)
    kwargs = dit_inputs(conditioned)
    with pytest.raises(ValueError, match="given-frame mask"):
        conditioned(**kwargs)
    with pytest.raises(ValueError, match="expects 4"):
        tiny_dit()(**with_mask(kwargs, first_frames_mask(torch.tensor([1, 1]), 4)))
    with pytest.raises(ValueError, match="frame_conditioning"):
        tiny_dit(frame_conditioning="yes")


def test_conditioned_model_round_trips_through_save_pretrained(tmp_path):
    model = tiny_dit(frame_conditioning=True)
    with torch.no_grad():
        model.frame_mask_embed.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.frame_conditioning
    kwargs = with_mask(dit_inputs(model), first_frames_mask(torch.tensor([1, 2]), 4))
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs).sample, model(**kwargs).sample)


def test_frame_conditioned_input_appends_the_mask_channel():
    latents = torch.randn(2, 4, 3, 2, 2)
    out = frame_conditioned_input(latents, first_frames_mask(torch.tensor([1, 2]), 3))
    assert out.shape == (2, 5, 3, 2, 2) and torch.equal(out[:, :4], latents)
    assert out[0, 4, :, 0, 0].tolist() == [1, 0, 0] and out[1, 4, :, 1, 1].tolist() == [1, 1, 0]


# ----------------------------------------------------------------------------------------------------
# Flow: masks, the loss on the frames to generate, the Euler sampler
# ----------------------------------------------------------------------------------------------------


def test_first_frames_mask_and_impose_by_hand():
    mask = first_frames_mask(torch.tensor([0, 1, 3]), 3)
    assert mask.shape == (3, 1, 3, 1, 1) and mask.dtype == torch.bool
    assert mask[:, 0, :, 0, 0].tolist() == [[False, False, False], [True, False, False], [True, True, True]]
    x, given = torch.zeros(3, 2, 3, 1, 1), torch.ones(3, 2, 3, 1, 1)
    assert impose_frames(x, given, mask)[:, :, :, 0, 0].sum(dim=1).tolist() == [[0, 0, 0], [2, 0, 0], [2, 2, 2]]


def test_masked_loss_covers_only_the_frames_to_generate():
    x0 = torch.randn(2, 3, 4, 2, 2)
    text = torch.zeros(2, 1, 8)
    frame_mask = first_frames_mask(torch.tensor([1, 2]), 4)
    seen = []

    def zero(x_t, *_):
        seen.append(x_t)
        return torch.zeros_like(x_t)

    def garbage_on_given_frames(x_t, *_):
        return torch.where(frame_mask, 1e3, torch.zeros_like(x_t))

    loss = flow_matching_loss(zero, x0, text, generator=torch.Generator().manual_seed(0), frame_mask=frame_mask)
    # By hand, with the same draws: target = noise - x0 on frames 1-3 of sample 0 and frames 2-3 of sample 1.
    gen = torch.Generator().manual_seed(0)
    sigmas = sample_logit_normal(2, 0.0, 1.0, gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t, target = interpolate(x0, noise, sigmas)
    by_hand = torch.cat([target[0, :, 1:].flatten(), target[1, :, 2:].flatten()]).square().mean()
    torch.testing.assert_close(loss, by_hand)
    # The model saw the given frames clean and the others noisy.
    assert torch.equal(seen[0], impose_frames(x_t, x0, frame_mask))
    # Whatever the model says on given frames costs nothing.
    same = flow_matching_loss(garbage_on_given_frames, x0, text, generator=torch.Generator().manual_seed(0),
                              frame_mask=frame_mask)  # fmt: skip
    torch.testing.assert_close(same, loss)
    # No frame given: the plain loss.
    none_given = first_frames_mask(torch.tensor([0, 0]), 4)
    torch.testing.assert_close(
        flow_matching_loss(zero, x0, text, generator=torch.Generator().manual_seed(0), frame_mask=none_given),
        flow_matching_loss(zero, x0, text, generator=torch.Generator().manual_seed(0)),
    )


def test_denoise_integrates_a_straight_path_and_holds_given_frames():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 2, 2, generator=gen), torch.randn(2, 3, 4, 2, 2, generator=gen)
    sigmas = shift_sigmas(torch.linspace(1, 0, 7), 3.0)
    # The exact velocity of the straight path from noise to x0 brings Euler to x0.
    torch.testing.assert_close(denoise(lambda x, sigma: noise - x0, noise, sigmas), x0)

    given = torch.randn(2, 3, 4, 2, 2, generator=gen)
    frame_mask = first_frames_mask(torch.tensor([1, 3]), 4)
    calls = []

    def velocity(x, sigma):
        calls.append(sigma)
        assert torch.equal(impose_frames(x, given, frame_mask), x)  # held at every step
        return torch.randn(x.shape, generator=gen)

    out = denoise(velocity, noise, sigmas, given, frame_mask)
    assert len(calls) == 6 and torch.equal(out[0, :, :1], given[0, :, :1]) and torch.equal(out[1, :, :3], given[1, :, :3])
    assert not torch.allclose(out[0, :, 1:], given[0, :, 1:])
    with pytest.raises(ValueError, match="both"):
        denoise(velocity, noise, sigmas, given=given)


# ----------------------------------------------------------------------------------------------------
# Training: the sampler, the config, the task
# ----------------------------------------------------------------------------------------------------


def test_sample_given_frames():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert sample_given_frames(4, 5, ConditionFramesConfig(), gen).tolist() == [0, 0, 0, 0]
    assert torch.equal(gen.get_state(), state)  # off: nothing drawn, plain training keeps its noise

    assert sample_given_frames(4, 5, ConditionFramesConfig(image_prob=1.0), gen).tolist() == [1, 1, 1, 1]
    extend = sample_given_frames(1000, 5, ConditionFramesConfig(extend_prob=1.0, extend_min=2, extend_max=4), gen)
    assert set(extend.tolist()) == {2, 3, 4}

    cfg = ConditionFramesConfig(image_prob=0.3, extend_prob=0.2, extend_min=2, extend_max=3)
    mixed = sample_given_frames(20000, 5, cfg, torch.Generator().manual_seed(1))
    shares = [(mixed == k).float().mean().item() for k in (0, 1, 2, 3)]
    assert shares == pytest.approx([0.5, 0.3, 0.1, 0.1], abs=0.02)
    again = sample_given_frames(20000, 5, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(mixed, again)  # the loop's generator decides everything

    # A frame is always left to generate: a still image (one latent frame) is never given.
    assert sample_given_frames(8, 1, ConditionFramesConfig(image_prob=1.0), gen).tolist() == [0] * 8
    assert set(sample_given_frames(50, 3, ConditionFramesConfig(extend_prob=1.0, extend_max=3), gen).tolist()) == {2}


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.condition_frames.image_prob=1.5", "image_prob"),
        ("data.condition_frames.extend_prob=0.6", "must be <= 1"),
        ("data.condition_frames.extend_min=0", "extend_min"),
        ("data.condition_frames.extend_max=1", "extend_min"),
    ],
)
def test_condition_frames_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEBUG, ["data.condition_frames.image_prob=0.5", override])


def test_a_still_image_encodes_to_the_first_latent_frame():
    """A causal VAE: an image (a 1-frame video) is the first latent frame of any clip starting with it, and the
    first 1 + r (k - 1) frames are its first k latent frames; so training on a clip's first latent frames
    teaches the model to take an image or a clip's beginning."""
    from t2v.models.loading import load_vae

    torch.manual_seed(0)
    clip = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    for vae, ratio in ((tiny_vae(), 2), (load_vae(f"{t2v.DEFAULT_MODEL}/vae", 0).eval(), 4)):
        with torch.no_grad():
            latents = vae.encode(clip).latent_dist.mean
            image = vae.encode(clip[:, :, :1]).latent_dist.mean
            start = vae.encode(clip[:, :, : 1 + ratio * 2]).latent_dist.mean
        torch.testing.assert_close(image, latents[:, :, :1], rtol=0, atol=1e-5)
        torch.testing.assert_close(start, latents[:, :, :3], rtol=0, atol=1e-5)


def conditioned_dit_yaml(tmp_path) -> str:
    path = tmp_path / "dit_tiny_conditioned.yaml"
    OmegaConf.save(OmegaConf.create({**preset("dit_tiny"), "frame_conditioning": True}), path)
    return str(path)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from t2v.data.shapes import write_dataset

    return str(write_dataset(tmp_path_factory.mktemp("clips"), num=4, seed=0))


def test_task_refuses_what_cannot_train(tmp_path, manifest):
    from t2v.train.dit_task import DiTTask

    base = [f"data.manifest={manifest}", f"output_dir={tmp_path}"]
    with pytest.raises(ValueError, match="add_frame_conditioning"):
        DiTTask(load_config(DEBUG, [*base, "data.condition_frames.image_prob=0.5"]))
    conditioned = f"model.dit={conditioned_dit_yaml(tmp_path)}"
    with pytest.raises(ValueError, match="no latent frame to generate"):  # 5 frames, tiny VAE: 3 latent frames
        DiTTask(load_config(DEBUG, [*base, conditioned, "data.condition_frames.extend_prob=0.5"]))
    with pytest.raises(ValueError, match="validation_prompts"):
        DiTTask(load_config(DEBUG, [*base, conditioned, "train.validation_prompts=[a red circle]"]))


class Spy(torch.nn.Module):
    """The model, recording its inputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, hidden_states, *args):
        self.inputs.append(hidden_states)
        return self.model(hidden_states, *args)


@pytest.mark.parametrize("source", ["manifest", "cache", "shapes"])
def test_every_source_trains_with_given_frames(tmp_path, manifest, source):
    from t2v.train.dit_task import DiTTask

    overrides = [f"output_dir={tmp_path / 'run'}", f"model.dit={conditioned_dit_yaml(tmp_path)}",
                 "data.condition_frames.image_prob=0.5", "data.condition_frames.extend_prob=0.5",
                 "data.condition_frames.extend_min=2", "data.condition_frames.extend_max=2"]
    if source == "manifest":
        overrides.append(f"data.manifest={manifest}")
    elif source == "cache":
        from t2v.data.cache import finalize_cache, write_cache

        maker = DiTTask(load_config(DEBUG, [f"data.manifest={manifest}", f"output_dir={tmp_path / 'maker'}"]))
        write_cache(str(tmp_path / "cache"), manifest, maker.vae, maker.text, frames=5, height=32, width=32,
                    fps=8.0, batch_size=2, dtype=torch.float32)
        finalize_cache(str(tmp_path / "cache"), num_rows=4)
        overrides += [f"data.manifest={manifest}", "data.source=cache", f"data.cache={tmp_path / 'cache'}"]
    else:
        overrides += ["data.source=shapes", "data.frames=17", "data.height=64", "data.width=64"]
    task = DiTTask(load_config(DEBUG, overrides))
    batch, spy = task.next_batch(), Spy(task.model)
    out = task.loss(spy, batch, torch.Generator().manual_seed(3))
    assert torch.isfinite(out.loss)

    x0, _ = task.encode(batch, torch.Generator().manual_seed(3))  # the same draws as inside the loss
    (hidden_states,) = spy.inputs
    latents, mask = hidden_states[:, :-1], hidden_states[:, -1]
    given = mask[:, :, 0, 0].sum(dim=1).long()  # (B,)
    assert set(given.tolist()) <= {1, 2} and torch.equal(mask.bool(), first_frames_mask(given, x0.shape[2])[:, 0]
                                                         .expand_as(mask))  # fmt: skip
    for b, k in enumerate(given.tolist()):
        assert torch.equal(latents[b, :, :k], x0[b, :, :k])  # given frames clean
        assert not torch.allclose(latents[b, :, k:], x0[b, :, k:])  # the rest noisy


def test_train_on_shapes_then_generate_from_a_given_first_frame(tmp_path):
    """A tiny conditioned DiT trains a few steps on Shapes World, then samples with frame 0 of a clip given."""
    from t2v.flow import flow_shift, num_tokens
    from t2v.train import trainer
    from t2v.train.dit_task import DiTTask

    cfg = load_config(DEBUG, [f"output_dir={tmp_path / 'run'}", f"model.dit={conditioned_dit_yaml(tmp_path)}",
                              "data.source=shapes", "data.frames=17", "data.height=64", "data.width=64",
                              "data.condition_frames.image_prob=0.5", "data.condition_frames.extend_prob=0.3",
                              "data.condition_frames.extend_min=2", "data.condition_frames.extend_max=6",
                              "train.max_steps=4", "train.log_every=1", "train.ckpt_every=0"])
    task = DiTTask(cfg)
    trainer.train(cfg, task)
    model = task.model.eval()
    assert model.frame_mask_embed.weight.abs().sum() > 0  # the mask embedding trained

    batch = task.next_batch()
    with torch.no_grad():
        x0, text = task.encode(batch, torch.Generator().manual_seed(0))  # (2, 4, 9, 32, 32)
        frame_mask = first_frames_mask(torch.tensor([1, 1]), x0.shape[2])
        shift = flow_shift(num_tokens(x0.shape[2:], model.config.patch_size), cfg.flow)
        sigmas = shift_sigmas(torch.linspace(1, 0, 5), shift)

        def velocity(x, sigma):
            hidden_states = frame_conditioned_input(x, frame_mask)
            return model(hidden_states, sigma * 1000, text.states, text.mask, text.pooled).sample

        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        out = denoise(velocity, noise, sigmas, x0, frame_mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, :1], x0[:, :, :1])  # the given frame, exactly
    assert not torch.allclose(out[:, :, 1:], noise[:, :, 1:])  # the rest was generated

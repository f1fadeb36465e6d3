import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from helpers import tiny_dit, tiny_pipeline, tiny_wan_vae

from pipelines import T2VPipeline, T2VPipelineOutput
from t2v.models.text_encoder import TextEmbeddings


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _run(pipe, prompt="a red circle", seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kw)


def test_output_shape_range_and_slice(pipe):
    d = pipe.config.generation_defaults
    out = _run(pipe, ["a red circle", "a blue square"])
    assert isinstance(out, T2VPipelineOutput)
    frames = out.frames
    assert frames.shape == (2, d["num_frames"], d["height"], d["width"], 3)
    assert frames.min() >= 0 and frames.max() <= 1
    # Same seed gives the same video; another seed another one.
    again = _run(pipe, ["a red circle", "a blue square"]).frames
    np.testing.assert_array_equal(frames, again)
    other = _run(pipe, ["a red circle", "a blue square"], seed=1).frames
    assert np.abs(frames - other).max() > 1e-3
    # Expected slice: a batched call equals the single-prompt call with the same generator.
    single = pipe("a red circle", generator=[torch.Generator().manual_seed(0)]).frames
    batched = pipe(["a red circle", "a blue square"],
                   generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]).frames
    np.testing.assert_allclose(single[0, 0, :3, :3, 0], batched[0, 0, :3, :3, 0], atol=1e-5)


def test_prompt_changes_video(pipe):
    a = _run(pipe, "a red circle").frames
    b = _run(pipe, "a green triangle moving up").frames
    assert np.abs(a - b).max() > 1e-4


def test_output_types_and_videos_per_prompt(pipe):
    d = pipe.config.generation_defaults
    pt = _run(pipe, output_type="pt", num_videos_per_prompt=2).frames
    assert pt.shape == (2, d["num_frames"], 3, d["height"], d["width"])
    pil = _run(pipe, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == d["num_frames"]
    lat = _run(pipe, output_type="latent").frames
    assert lat.ndim == 5 and lat.shape[1] == pipe.transformer.config.in_channels
    tup = _run(pipe, return_dict=False)
    assert isinstance(tup, tuple)


def test_prompt_embeds_equal_prompt(pipe):
    embeds = pipe.encode_prompt(["a red circle"], "cpu")
    negative = pipe.encode_prompt([""], "cpu")
    a = _run(pipe, "a red circle").frames
    b = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative,
             generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_callback_on_step_end(pipe):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"]}

    _run(pipe, callback_on_step_end=cb)
    assert seen == list(range(pipe.config.generation_defaults["num_inference_steps"]))


@pytest.mark.parametrize("scheduler_cls", [UniPCMultistepScheduler, DPMSolverMultistepScheduler])
def test_other_flow_schedulers(pipe, scheduler_cls):
    sched = scheduler_cls(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    p = T2VPipeline(**{**pipe.components, "scheduler": sched}, max_sequence_length=16,
                    generation_defaults=pipe.config.generation_defaults)
    frames = _run(p, num_inference_steps=3).frames
    assert np.isfinite(frames).all()


def test_save_load_roundtrip(pipe, tmp_path):
    a = _run(pipe).frames
    pipe.save_pretrained(tmp_path / "p")
    loaded = T2VPipeline.from_pretrained(tmp_path / "p")
    b = _run(loaded).frames
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert (tmp_path / "p" / "model_index.json").exists()
    assert list((tmp_path / "p" / "transformer").glob("*.safetensors"))


def test_text_encoder_source(pipe, tmp_path):
    # A folder saved without its text encoder loads it by name.
    c = pipe.components
    p = T2VPipeline(vae=c["vae"], transformer=c["transformer"], scheduler=c["scheduler"],
                    text_encoder_source="tiny-random", max_sequence_length=16,
                    generation_defaults=pipe.config.generation_defaults)
    p.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "text_encoder").exists()
    loaded = T2VPipeline.from_pretrained(tmp_path / "p")
    np.testing.assert_allclose(_run(loaded).frames, _run(pipe).frames, atol=1e-6)


def test_wan_vae_in_place_of_ours(tmp_path):
    p = tiny_pipeline(vae=tiny_wan_vae())
    frames = _run(p).frames
    d = p.config.generation_defaults
    assert frames.shape == (1, d["num_frames"], d["height"], d["width"], 3)
    p.save_pretrained(tmp_path / "w")
    again = _run(T2VPipeline.from_pretrained(tmp_path / "w")).frames
    np.testing.assert_allclose(frames, again, atol=1e-6)


def test_model_cpu_offload_runs(pipe):
    p = T2VPipeline(**pipe.components, max_sequence_length=16, generation_defaults=pipe.config.generation_defaults)
    try:
        p.enable_model_cpu_offload(device="cpu")
    except (ValueError, RuntimeError) as e:  # some diffusers versions refuse offloading to the CPU itself
        pytest.skip(f"cpu offload to cpu refused: {e}")
    assert np.isfinite(_run(p).frames).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_frames": 4}, "num_frames 4"),
        ({"height": 7}, "height 7"),
        ({"width": 10}, "width 10"),
        ({"prompt": []}, "non-empty list"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "negative_prompt has 1"),
        ({"num_inference_steps": 0}, "num_inference_steps 0"),
        ({"guidance_scale": float("nan")}, "guidance nan"),
        ({"guidance_scale": -1.0}, "guidance -1.0"),
        ({"num_videos_per_prompt": 0}, "num_videos_per_prompt 0"),
        ({"output_type": "mp4"}, "output_type"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback tensor input 'noise'"),
    ],
)
def test_bad_inputs_raise(pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_mismatched_embeds_raise(pipe):
    a = pipe.encode_prompt(["x", "y"], "cpu")
    b = pipe.encode_prompt(["z"], "cpu")
    with pytest.raises(ValueError, match="batch"):
        pipe(prompt_embeds=a, negative_prompt_embeds=b)
    # Prompts as strings against negative embeddings, and embeddings against a list of negative prompts.
    with pytest.raises(ValueError, match="prompt 2 differs from negative_prompt_embeds batch 1"):
        pipe(prompt=["x", "y"], negative_prompt_embeds=b)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but prompt_embeds batch has 2"):
        pipe(prompt_embeds=a, negative_prompt=["n"])


class _OracleTransformer(torch.nn.Module):
    """Predicts the exact velocity towards a known clean latent: +2 for positive text, -1 for negative.

    With x_t = (1 - sigma) x0 + sigma eps and timestep = sigma * 1000 the velocity eps - x0 is
    (x_t - x0) / sigma, and Euler steps x + (sigma_next - sigma) v land exactly on x0 at sigma = 0.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.batches = []  # the batch size of every call

    @property
    def dtype(self):
        return self.anchor.dtype

    @property
    def device(self):
        return self.anchor.device

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None,
                pooled_projections=None, return_dict=True):
        self.batches.append(hidden_states.shape[0])
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        positive = encoder_hidden_states.mean(dim=(1, 2)) > 0  # (B,)
        x0 = torch.where(positive.view(-1, 1, 1, 1, 1), 2.0, -1.0).expand_as(hidden_states)
        return ((hidden_states - x0) / sigma,)


def test_denoising_loop_follows_the_training_convention(pipe):
    # Timestep scale, velocity sign, Euler step and the cond/uncond order of guidance, end to end:
    # the sampled latent must be x0_uncond + g (x0_cond - x0_uncond) exactly.
    from t2v.models.text_encoder import TextEmbeddings

    c = pipe.components
    p = T2VPipeline(**{**c, "transformer": _OracleTransformer(c["transformer"].config)}, max_sequence_length=16,
                    generation_defaults=pipe.config.generation_defaults)

    def embeds(value):
        return TextEmbeddings(states=torch.full((1, 4, 8), value), mask=torch.ones(1, 4, dtype=torch.bool),
                              pooled=torch.full((1, 8), value))

    for guidance, expected in ((1.0, 2.0), (3.0, -1.0 + 3.0 * (2.0 - -1.0))):
        latents = p(prompt_embeds=embeds(1.0), negative_prompt_embeds=embeds(-1.0), guidance_scale=guidance,
                    num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
        torch.testing.assert_close(latents, torch.full_like(latents, expected), atol=1e-5, rtol=0)


def _oracle_pipeline(pipe):
    from t2v.models.text_encoder import TextEmbeddings

    c = pipe.components
    p = T2VPipeline(**{**c, "transformer": _OracleTransformer(c["transformer"].config)}, max_sequence_length=16,
                    generation_defaults=pipe.config.generation_defaults)

    def embeds(value):
        return TextEmbeddings(states=torch.full((1, 4, 8), value), mask=torch.ones(1, 4, dtype=torch.bool),
                              pooled=torch.full((1, 8), value))

    def sample(guidance, callback=None):
        return p(prompt_embeds=embeds(1.0), negative_prompt_embeds=embeds(-1.0), guidance_scale=guidance,
                 num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=callback).frames

    return p, sample


def test_callback_reads_the_run_and_changes_guidance_for_the_steps_left(pipe):
    """diffusers' dynamic-CFG pattern. With the oracle the last step lands on the x0 its guidance mixes, so the
    result shows which guidance the last steps ran with, and the batch sizes whether uncond rows ran."""
    p, sample = _oracle_pipeline(pipe)
    seen = []

    def guidance_after(step, value):
        def callback(pipeline, i, t, tensors):
            seen.append((i, pipeline.num_timesteps, pipeline.guidance_scale, pipeline.do_classifier_free_guidance))
            if i == step:
                pipeline._guidance_scale = value
            return tensors

        return callback

    latents = sample(3.0, guidance_after(1, 0.0))  # guidance off after step 1: the cond x0 alone
    torch.testing.assert_close(latents, torch.full_like(latents, 2.0), atol=1e-5, rtol=0)
    assert seen == [(0, 4, 3.0, True), (1, 4, 3.0, True), (2, 4, 0.0, False), (3, 4, 0.0, False)]
    assert p.transformer.batches == [2, 2, 1, 1]
    latents = sample(3.0, guidance_after(0, 2.0))  # another scale: x0_uncond + 2 (x0_cond - x0_uncond)
    torch.testing.assert_close(latents, torch.full_like(latents, -1.0 + 2.0 * 3.0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rose above 1 during sampling, but the call began without guidance"):
        sample(1.0, guidance_after(0, 3.0))


def test_interrupt_stops_the_loop(pipe):
    p, sample = _oracle_pipeline(pipe)

    def stop_after_step_1(pipeline, i, t, tensors):
        pipeline._interrupt = i == 1
        return tensors

    sample(3.0, stop_after_step_1)
    assert p.transformer.batches == [2, 2] and p.interrupt
    p.transformer.batches.clear()
    sample(3.0)  # the next call runs in full
    assert p.transformer.batches == [2, 2, 2, 2] and not p.interrupt and p.current_timestep is None


def test_prompt_embeddings_without_the_transformer_and_vae(pipe, tmp_path):
    """A pipeline loaded with transformer=None, vae=None encodes prompts (to precompute them on a small GPU);
    generating needs the missing models and says so."""
    pipe.save_pretrained(tmp_path / "p")
    text_only = T2VPipeline.from_pretrained(tmp_path / "p", transformer=None, vae=None)
    assert text_only.transformer is None and text_only.vae is None
    embeds, negative = text_only.encode_prompt(["a red circle"], "cpu"), text_only.encode_prompt([""], "cpu")
    assert torch.equal(embeds.states, pipe.encode_prompt(["a red circle"], "cpu").states)
    with pytest.raises(ValueError, match="this pipeline has no transformer: it can encode prompts"):
        text_only(prompt_embeds=embeds)
    text_only.transformer = pipe.transformer
    with pytest.raises(ValueError, match="this pipeline has no vae"):
        text_only(prompt_embeds=embeds)
    frames = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(frames.frames, _run(pipe).frames, atol=1e-6)
    # Built by hand without them, saved and loaded back.
    c = pipe.components
    built = T2VPipeline(**{**c, "vae": None, "transformer": None}, max_sequence_length=16)
    built.save_pretrained(tmp_path / "t")
    loaded = T2VPipeline.from_pretrained(tmp_path / "t")
    assert loaded.transformer is None and loaded.vae is None
    assert torch.equal(loaded.encode_prompt(["a red circle"], "cpu").states, embeds.states)


def test_prompt_embeds_as_one_tensor(pipe):
    """diffusers pipelines take prompt embeddings as one tensor: every token real, no pooled vector, which a
    transformer that takes one refuses by name."""
    embeds = pipe.encode_prompt(["a red circle"], "cpu")
    with pytest.raises(ValueError, match=r"takes a pooled text vector \(pooled_dim=16\)"):
        pipe(prompt_embeds=embeds.states, guidance_scale=1.0)
    no_pooled = T2VPipeline(**{**pipe.components, "transformer": tiny_dit(text_dim=16, pooled_dim=0)},
                            max_sequence_length=16, generation_defaults=pipe.config.generation_defaults)
    length = int(embeds.mask.sum())
    real = embeds.states[:, :length]
    a = no_pooled(prompt_embeds=real, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).frames
    b = no_pooled(prompt_embeds=TextEmbeddings(real, None, None), guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_array_equal(a, b)


def test_text_encoder_source_loads_in_the_text_encoder_dtype(pipe, tmp_path):
    c = pipe.components
    p = T2VPipeline(vae=c["vae"], transformer=c["transformer"], scheduler=c["scheduler"],
                    text_encoder_source="tiny-random", max_sequence_length=16,
                    generation_defaults=pipe.config.generation_defaults)
    p.save_pretrained(tmp_path / "p")
    loaded = T2VPipeline.from_pretrained(tmp_path / "p", dtype={"text_encoder": torch.bfloat16,
                                                                "default": torch.float32})  # fmt: skip
    assert loaded.text_encoder.dtype == torch.bfloat16 and loaded.transformer.dtype == torch.float32
    assert loaded.encode_prompt(["a red circle"], "cpu").states.dtype == torch.bfloat16
    assert np.isfinite(_run(loaded).frames).all()
    assert T2VPipeline.from_pretrained(tmp_path / "p").text_encoder.dtype == torch.float32


def test_text_padding_is_cut_once_and_changes_nothing(pipe):
    from t2v.models.text_encoder import TextEmbeddings
    from t2v.pipelines.pipeline_t2v import _text_batch

    embeds = pipe.encode_prompt(["a red circle", "a large blue square moving up"], "cpu")
    negative = pipe.encode_prompt(["", ""], "cpu")

    def pad(e: TextEmbeddings, extra: int) -> TextEmbeddings:  # more padding columns: zero states, mask False
        return TextEmbeddings(states=torch.cat([e.states, e.states.new_zeros(e.states.shape[0], extra,
                                                                              e.states.shape[2])], 1),
                              mask=torch.cat([e.mask, e.mask.new_zeros(e.mask.shape[0], extra)], 1), pooled=e.pooled)

    text = _text_batch(embeds, negative)  # uncond rows first
    states, mask = text.states, text.mask
    longest = int(torch.cat([negative.mask, embeds.mask]).sum(1).max())
    assert states.shape[:2] == (4, longest) and mask.shape == (4, longest)
    assert mask[:2].sum() < mask[2:].sum()  # the empty negative prompt keeps its padding mask
    text = _text_batch(TextEmbeddings(embeds.states[1:], embeds.mask[1:], embeds.pooled[1:]), None)
    states, mask = text.states, text.mask
    assert mask is None and states.shape[1] == int(embeds.mask[1].sum())  # all real: no mask

    run = dict(generator=torch.Generator().manual_seed(0), output_type="latent", num_inference_steps=3)
    base = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **run).frames
    run["generator"] = torch.Generator().manual_seed(0)
    padded = pipe(prompt_embeds=pad(embeds, 5), negative_prompt_embeds=pad(negative, 5), **run).frames
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=1e-5)


def test_prompt_embeds_without_a_mask_mean_all_tokens_real(pipe):
    from t2v.models.text_encoder import TextEmbeddings

    embeds = pipe.encode_prompt(["a red circle"], "cpu")
    length = int(embeds.mask.sum())  # user embeddings of the real tokens only, with or without a mask
    real = TextEmbeddings(embeds.states[:, :length], embeds.mask[:, :length], embeds.pooled)
    unmasked = TextEmbeddings(real.states, None, real.pooled)
    run = dict(output_type="latent", num_inference_steps=2, num_videos_per_prompt=2, guidance_scale=1.0)
    a = pipe(prompt_embeds=real, generator=torch.Generator().manual_seed(0), **run)
    b = pipe(prompt_embeds=unmasked, generator=torch.Generator().manual_seed(0), **run)
    torch.testing.assert_close(b.frames, a.frames)


def test_shapes_eval_frames_match_the_pipeline_and_the_pooled_diagnostic(pipe):
    from t2v.eval.shapes_eval import generate_frames

    prompts = ["a red circle", "a blue square"]
    frames = generate_frames(pipe, prompts, [3, 4], batch_size=1, num_inference_steps=2)
    direct = pipe(prompts, generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)],
                  num_inference_steps=2).frames
    np.testing.assert_array_equal(np.stack(frames), (direct * 255).round().clip(0, 255).astype(np.uint8))
    assert pipe.transformer.config.pooled_dim > 0
    empty = generate_frames(pipe, prompts, [3, 4], pooled="empty", num_inference_steps=2)
    assert any(np.abs(a.astype(int) - b).max() > 0 for a, b in zip(frames, empty))
    with pytest.raises(ValueError, match="pooled 'none'"):
        generate_frames(pipe, prompts, [3, 4], pooled="none")


def test_a_prompts_noise_does_not_depend_on_its_batch(pipe):
    """The README's guarantee: each prompt's noise comes from its own seed whatever else is in the batch; a
    prompt alone and in a batch then differ only by the rounding of batched arithmetic."""
    d = pipe.config.generation_defaults
    args = (d["num_frames"], d["height"], d["width"], torch.float32, "cpu")
    alone = pipe.prepare_latents(1, *args, [torch.Generator().manual_seed(3)])
    batch = pipe.prepare_latents(2, *args, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    assert torch.equal(alone[0], batch[0])
    one = pipe("a red circle", generator=[torch.Generator().manual_seed(3)]).frames[0]
    two = pipe(["a red circle", "a blue square"],
               generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).frames[0]
    assert np.abs(one - two).max() <= 4 / 255


def test_generation_defaults_come_from_the_saved_config_and_nowhere_else(pipe, tmp_path):
    from t2v.pipelines.pipeline_t2v import SAMPLER_DEFAULTS

    c = pipe.components
    bare = T2VPipeline(**c, max_sequence_length=16)  # built by hand: no saved clip shape
    assert bare.config.generation_defaults == SAMPLER_DEFAULTS
    assert bare.generation_settings(num_inference_steps=None, guidance_scale=2.0) == {
        "num_inference_steps": SAMPLER_DEFAULTS["num_inference_steps"], "guidance_scale": 2.0}
    with pytest.raises(ValueError, match="num_frames is not given and this pipeline has no saved default"):
        bare("a red circle")
    d = pipe.config.generation_defaults
    clip = {key: d[key] for key in ("num_frames", "height", "width")}
    np.testing.assert_array_equal(_run(bare, num_inference_steps=d["num_inference_steps"],
                                       guidance_scale=d["guidance_scale"], **clip).frames, _run(pipe).frames)
    with pytest.raises(ValueError, match=r"unknown keys \['frames'\]"):
        T2VPipeline(**c, generation_defaults={"frames": 5})
    with pytest.raises(ValueError, match="unknown generation settings"):
        pipe.generation_settings(steps=3)
    # What a saved folder states is what a loaded pipeline defaults to.
    pipe.save_pretrained(tmp_path / "p")
    assert T2VPipeline.from_pretrained(tmp_path / "p").config.generation_defaults == d


def test_encode_prompt_is_the_training_text_embedder(pipe):
    from t2v.models.text_encoder import TextEmbedder

    prompts = ["a red circle", "a large blue square moving up"]
    ours = pipe.encode_prompt(prompts, "cpu")
    training = TextEmbedder(pipe.tokenizer, pipe.text_encoder, pipe.config.max_sequence_length)(prompts)
    for name in ("states", "mask", "pooled"):
        assert torch.equal(getattr(ours, name), getattr(training, name))
    # A second encoder supplies the pooled vector, read as far as it can (here its 128 positions).
    two = T2VPipeline(**{**pipe.components, "text_encoder_2": pipe.text_encoder, "tokenizer_2": pipe.tokenizer},
                      max_sequence_length=16, generation_defaults=pipe.config.generation_defaults)
    pooled = TextEmbedder(pipe.tokenizer, pipe.text_encoder, 16, pipe.tokenizer, pipe.text_encoder)(prompts).pooled
    assert torch.equal(two.encode_prompt(prompts, "cpu").pooled, pooled)
    assert TextEmbedder(pipe.tokenizer, pipe.text_encoder, 16, pipe.tokenizer, pipe.text_encoder).max_length_2 == 128


@pytest.mark.parametrize("dynamic", [True, False])
def test_training_and_sampling_shift_a_clip_alike(pipe, dynamic):
    """The shift training draws its sigmas with equals the shift of the sampler that export gives the pipeline."""
    from t2v.config import FlowConfig
    from t2v.flow import flow_shift, num_tokens, shift_sigmas
    from t2v.train.export import flow_scheduler

    flow = FlowConfig(dynamic_shift=dynamic, shift=3.0, base_seq_len=4, max_seq_len=64)
    p = T2VPipeline(**{**pipe.components, "scheduler": flow_scheduler(flow)}, max_sequence_length=16,
                    generation_defaults=pipe.config.generation_defaults)
    seen = {}
    set_timesteps = p.scheduler.set_timesteps

    def spy(*args, **kwargs):
        seen["mu"] = kwargs.get("mu")
        return set_timesteps(*args, **kwargs)

    p.scheduler.set_timesteps = spy
    x0 = _run(p, output_type="latent", num_inference_steps=4).frames  # (B, C, T', H', W') as training's x0
    training = flow_shift(num_tokens(x0.shape[2:], p.transformer.config.patch_size), flow)
    sampling = math.exp(seen["mu"]) if dynamic else p.scheduler.config.shift
    assert training == sampling and training != 1.0
    if dynamic:  # the sampler's noise levels are evenly spaced ones shifted as training shifts its sigmas
        plain = torch.linspace(1.0, 1 / 1000, 4)
        torch.testing.assert_close(p.scheduler.sigmas[:-1], shift_sigmas(plain, training), atol=1e-6, rtol=1e-6)


def test_latent_shape_by_hand_and_its_errors():
    from helpers import tiny_vae

    from t2v.models.vae_utils import check_clip_shape, latent_shape

    vae = tiny_vae()  # 2x in time and space, 4 latent channels
    assert latent_shape(vae, 1, 8, 8) == (4, 1, 4, 4)
    assert latent_shape(vae, 9, 16, 24) == (4, 5, 8, 12)
    assert latent_shape(tiny_wan_vae(), 5, 8, 8) == (4, 3, 4, 4)
    with pytest.raises(ValueError, match=r"num_frames 4 must be 2k\+1"):
        latent_shape(vae, 4, 8, 8)
    with pytest.raises(ValueError, match="width 7 must be a positive multiple of 2"):
        latent_shape(vae, 5, 8, 7)
    with pytest.raises(ValueError, match="num_frames 3 gives 2 latent frames, not divisible by patch 3"):
        check_clip_shape(vae, (3, 1, 1), 3, 8, 8)
    with pytest.raises(ValueError, match=r"height 6 must be a positive multiple of 4 \(VAE factor 2 x patch size 2\)"):
        check_clip_shape(vae, (1, 2, 2), 5, 6, 8)

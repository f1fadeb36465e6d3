"""Conventions diffusers users rely on that diffusers' pipeline tester mixins found missing (see
docs/diffusers_conventions.md for the run); each test here failed before its fix."""

import pytest
import torch
from helpers import tiny_pipeline, tiny_wan_vae

from pipelines import T2VPipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _frames(pipe, **kw):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt", **kw).frames


@pytest.mark.parametrize("vae", ["ours", "wan"])
def test_from_pipe_switches_the_components_over(vae):
    # diffusers' from_pipe moves a model component only when its type is one the constructor is annotated with.
    p = tiny_pipeline() if vae == "ours" else tiny_pipeline(vae=tiny_wan_vae())
    again = T2VPipeline.from_pipe(p)
    assert again.vae is p.vae and again.transformer is p.transformer and again.text_encoder is p.text_encoder
    assert again.config.generation_defaults == p.config.generation_defaults
    torch.testing.assert_close(_frames(again), _frames(p))


def test_from_pipe_keeps_a_missing_vae_and_transformer_missing(pipe):
    text_only = T2VPipeline(vae=None, transformer=None, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder,
                            tokenizer=pipe.tokenizer, max_sequence_length=16)
    again = T2VPipeline.from_pipe(text_only)
    assert again.vae is None and again.transformer is None
    assert torch.equal(again.encode_prompt("a red circle").states, text_only.encode_prompt("a red circle").states)


def test_encode_prompt_takes_one_string_and_defaults_the_device(pipe):
    # As diffusers pipelines: `encode_prompt(prompt)` with a string and no device gives what `__call__` takes.
    embeds = pipe.encode_prompt("a red circle")
    listed = pipe.encode_prompt(["a red circle"], "cpu")
    assert embeds.states.shape[0] == 1 and embeds.states.device == pipe._execution_device
    assert torch.equal(embeds.states, listed.states) and torch.equal(embeds.pooled, listed.pooled)
    by_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=pipe.encode_prompt(""), output_type="pt",
                     generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(by_embeds, _frames(pipe), atol=1e-6, rtol=0)

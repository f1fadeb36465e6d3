"""T2VPipeline: text-to-video sampling with a video VAE, a video DiT and frozen text encoders.

Stages follow diffusers' video pipelines: 1. check inputs, 2. encode prompt, 3. timesteps, 4. latents,
5. denoise with classifier-free guidance, 6. decode. What a call leaves unset comes from the pipeline's
saved `generation_defaults` (`generation_settings`); the flow shift, token count, latent shape and prompt
encoding are the ones training uses (`t2v.flow`, `t2v.models.vae_utils`, `TextEmbedder`). A Wan 2.1
pipeline folder loads converted (`t2v.pipelines.wan`).

A frame-conditioned transformer also animates a given image (`image=`) or extends a given clip (`video=`):
the given frames are encoded, held clean at every step and marked by the mask channel, as in training
(`t2v.flow.impose_frames`, `t2v.models.dit.frame_conditioned_input`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from einops import rearrange

from t2v.data.video import cover_and_crop
from t2v.flow import first_frames_mask, impose_frames, num_tokens, shift_mu
from t2v.generation import guidance_error

# Imported so that diffusers can resolve saved components named by these modules (and the constructor's types).
from t2v.models.dit import VideoDiT, frame_conditioned_input
from t2v.models.text_encoder import TextEmbedder, TextEmbeddings, check_dtype_on_device, load_text_encoder
from t2v.models.vae import CausalVideoVAE
from t2v.models.vae_utils import (
    check_clip_shape,
    denormalize_latents,
    latent_shape,
    normalize_latents,
    vae_scale_factors,
)
from t2v.pipelines.lora import T2VLoraLoaderMixin
from t2v.pipelines.wan import component_dtype, is_wan_pipeline_folder, wan_pipeline_kwargs

logger = logging.get_logger(__name__)

# What `generation_defaults` may hold: the call's clip shape and sampler settings, and the frame rate a
# video is written at.
GENERATION_SETTINGS = ("num_frames", "height", "width", "num_inference_steps", "guidance_scale", "fps")
# The generic part: sampler settings that suit any flow-matching model. The clip shape and frame rate have no
# generic value (they are what the model was trained on), so they come from the saved folder or the call.
SAMPLER_DEFAULTS = {"num_inference_steps": 30, "guidance_scale": 5.0}
OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class T2VPipelineOutput(BaseOutput):
    """`frames`: (B, F, H, W, 3) floats in [0, 1] for "np", (B, F, 3, H, W) for "pt", lists of PIL images for
    "pil", or normalised latents (B, C, T, h, w) for "latent"."""

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]


class T2VPipeline(DiffusionPipeline, T2VLoraLoaderMixin):
    r"""Text-to-video generation.

    Components: `vae` (our `CausalVideoVAE` or a diffusers video VAE such as `AutoencoderKLWan`), `transformer`
    (`VideoDiT`), `text_encoder` + `tokenizer` (per-token states for cross-attention, any transformers encoder),
    optional `text_encoder_2` + `tokenizer_2` (pooled vector, e.g. CLIP), `scheduler` (a flow-matching scheduler:
    `FlowMatchEulerDiscreteScheduler`, or UniPC / DPM-Solver++ with `use_flow_sigmas`). When a saved pipeline
    leaves its text encoder out, `text_encoder_source` names where to load it from (path, hub id or "minilm").
    `vae` and `transformer` may be None: such a pipeline encodes prompts (`encode_prompt`) but does not sample.

    Text reaches a transformer that masks padding (`mask_text_padding`, our models) cut after the last real
    token of the batch; one that attends to its padding (Wan) gets every token the encoder padded to
    (`max_sequence_length`), zero past each prompt's end, as it was trained.

    diffusers' conventions hold during a call: `callback_on_step_end(pipe, i, t, tensors)` may read
    `pipe.num_timesteps` and `pipe.guidance_scale`, change the guidance of the steps left by setting
    `pipe._guidance_scale` (at most 1 turns guidance off), and stop the loop with `pipe._interrupt = True`.

    `generation_defaults` ({name: value} over GENERATION_SETTINGS) are what a call leaves unset: a trained
    pipeline saves its training clip shape, frame rate and validation sampler settings. Without them the
    sampler settings default to SAMPLER_DEFAULTS and a call must give num_frames, height and width (and
    `t2v.generation.generate_to_folder` the fps it writes at).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["vae", "transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: CausalVideoVAE | AutoencoderKLWan | AutoencoderKLCogVideoX | None,
        transformer: VideoDiT | None,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_source: str | None = None,
        max_sequence_length: int = 77,
        generation_defaults: dict | None = None,
    ):
        super().__init__()
        if type(transformer).__name__ == "WanTransformer3DModel":
            raise ValueError("transformer is a diffusers WanTransformer3DModel: convert it to a VideoDiT first "
                             "(t2v.models.wan.transformer_from_wan), or give T2VPipeline.from_pretrained the Wan "
                             "pipeline's local folder (a hub repository downloaded first), which converts it")
        generation_defaults = {**SAMPLER_DEFAULTS, **(generation_defaults or {})}
        if unknown := sorted(set(generation_defaults) - set(GENERATION_SETTINGS)):
            raise ValueError(f"generation_defaults has unknown keys {unknown}; known: {list(GENERATION_SETTINGS)}")
        self.register_modules(
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.register_to_config(
            text_encoder_source=text_encoder_source,
            max_sequence_length=max_sequence_length,
            generation_defaults=generation_defaults,
        )
        if text_encoder is None and text_encoder_source:
            # Kept out of the saved folder on purpose (e.g. a pip-installed encoder): load it by name.
            # The config entry stays (None, None), so save_pretrained keeps leaving it out.
            self.tokenizer, self.text_encoder = load_text_encoder(text_encoder_source)
        self.video_processor = VideoProcessor(vae_scale_factor=vae_scale_factors(vae)[1] if vae is not None else 8)
        # What a call exposes to its callback (diffusers' names); None before the first call.
        self._guidance_scale = self._num_timesteps = self._current_timestep = None
        self._interrupt = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, plus: a local WanPipeline folder (Wan 2.1 text-to-video) loads with its
        transformer converted to a VideoDiT (`t2v.pipelines.wan`), and a text encoder loaded by
        `text_encoder_source` takes the dtype asked for the text encoder (`dtype`, or {"text_encoder": ...})."""
        path = pretrained_model_name_or_path
        if os.path.isdir(path) and is_wan_pipeline_folder(path):
            logger.warning(f"{os.fspath(path)} is a Wan 2.1 pipeline: its transformer is converted to a VideoDiT "
                           "as it loads (save_pretrained keeps the converted pipeline)")
            kwargs = wan_pipeline_kwargs(path, kwargs)
        pipe = super().from_pretrained(path, **kwargs)
        dtype = component_dtype(kwargs, "text_encoder")
        if pipe.config.text_encoder_source and "text_encoder" not in kwargs and dtype is not None:
            pipe.text_encoder.to(dtype)
        return pipe

    # ------------------------------------------------------------------ what a callback reads
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self) -> torch.Tensor | None:
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ settings and inputs
    def generation_settings(self, **given) -> dict:
        """`given` (settings of GENERATION_SETTINGS) with each None taken from the saved generation defaults."""
        if unknown := sorted(set(given) - set(GENERATION_SETTINGS)):
            raise ValueError(f"unknown generation settings {unknown}; known: {list(GENERATION_SETTINGS)}")
        settings = {}
        for name, value in given.items():
            value = value if value is not None else self.config.generation_defaults.get(name)
            if value is None:
                raise ValueError(f"{name} is not given and this pipeline has no saved default for it "
                                 f"(generation_defaults {self.config.generation_defaults})")
            settings[name] = value
        return settings

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_frames,
        height,
        width,
        prompt_embeds,
        negative_prompt_embeds,
        num_inference_steps: int,
        guidance_scale: float,
        num_videos_per_prompt: int = 1,
        output_type: str = "np",
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        """Raise ValueError for any input a call would refuse; nothing else checks them."""
        for name in ("transformer", "vae"):
            if getattr(self, name) is None:
                raise ValueError(f"this pipeline has no {name}: it can encode prompts (encode_prompt) but not "
                                 f"generate; load it with one or set pipe.{name}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give either `prompt` or `prompt_embeds`")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give only one of `prompt` and `prompt_embeds`, not both")
        if prompt is not None:
            if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
                raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"every prompt must be a string, got {prompts!r}")
        if prompt is not None:
            n_prompts, source = (1 if isinstance(prompt, str) else len(prompt)), "prompt"
        else:
            n_prompts, source = prompt_embeds.states.shape[0], "prompt_embeds batch"
        if isinstance(negative_prompt, list) and len(negative_prompt) != n_prompts:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but {source} has {n_prompts}; "
                "give one negative prompt per prompt or a single string"
            )
        if negative_prompt_embeds is not None and negative_prompt_embeds.states.shape[0] != n_prompts:
            raise ValueError(
                f"{source} {n_prompts} differs from negative_prompt_embeds "
                f"batch {negative_prompt_embeds.states.shape[0]}"
            )
        check_clip_shape(self.vae, self.transformer.config.patch_size, num_frames, height, width)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps {num_inference_steps} must be at least 1")
        if (error := guidance_error(guidance_scale)) is not None:
            raise ValueError(error)
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt {num_videos_per_prompt} must be at least 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} must be one of {', '.join(map(repr, OUTPUT_TYPES))}")
        for k in callback_on_step_end_tensor_inputs:
            if k not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor input {k!r} must be one of {self._callback_tensor_inputs}")

    def check_frame_conditioning(self, image, video) -> None:
        """Raise ValueError unless this pipeline can take given frames: one of `image` and `video`, and a
        frame-conditioned transformer."""
        if image is not None and video is not None:
            raise ValueError("give `image` (image-to-video) or `video` (extension), not both")
        if self.transformer is not None and not self.transformer.config.frame_conditioning:
            raise ValueError("this transformer was trained without frame conditioning (frame_conditioning=False), "
                             "so it cannot take `image` or `video`; convert one with "
                             "t2v.models.dit.add_frame_conditioning and fine-tune it with data.condition_frames")

    def given_frame_count(self, frames: int, num_frames: int) -> int:
        """How many of `frames` leading video frames are given in a `num_frames` clip: 1 + ft (k - 1), the most
        that fill whole latent frames (k of them). Raises ValueError when no latent frame would remain to
        generate."""
        ft, _ = vae_scale_factors(self.vae)
        total = (num_frames - 1) // ft + 1
        k = (frames - 1) // ft + 1
        if k >= total:
            raise ValueError(f"{frames} given frames fill {k} latent frames but num_frames {num_frames} has {total}: "
                             f"give at most {1 + ft * (total - 2)} frames or a larger num_frames")
        return 1 + ft * (k - 1)

    def prepare_given_frames(self, image, video, batch, num_videos_per_prompt, num_frames, height, width, device):
        """The given frames encoded as training encodes clips (posterior mode, normalised), in a clip of the
        call's latent shape (B, C, T, h, w), and their mask (B, 1, T, 1, 1)."""
        pixels = given_pixels(image, video, height, width)  # (N, 3, F, H, W) in [-1, 1]
        if pixels.shape[0] not in (1, batch):
            raise ValueError(f"got {pixels.shape[0]} given {'images' if image is not None else 'videos'} for "
                             f"{batch} prompts; give one for all or one per prompt")
        pixels = pixels[:, :, : self.given_frame_count(pixels.shape[2], num_frames)]
        z = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist.mode()
        z = normalize_latents(self.vae, z.float())  # (N, C, k, h, w)
        z = z.expand(batch, -1, -1, -1, -1).repeat_interleave(num_videos_per_prompt, dim=0)
        channels, frames, h, w = latent_shape(self.vae, num_frames, height, width)
        given = torch.zeros(z.shape[0], channels, frames, h, w, device=device)
        given[:, :, : z.shape[2]] = z
        frame_mask = first_frames_mask(torch.full((z.shape[0],), z.shape[2], device=device), frames)
        return given, frame_mask

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None) -> TextEmbeddings:
        """`prompt` (one or a list) through the pipeline's text encoders by `TextEmbedder`, as training embeds its
        captions, on `device` (default: the execution device). The result is what `__call__` takes as
        `prompt_embeds` or `negative_prompt_embeds`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device if device is not None else self._execution_device
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder: pass `prompt_embeds`, or load one")
        for encoder in (self.text_encoder, self.text_encoder_2):
            if encoder is not None:
                check_dtype_on_device(encoder.dtype, device)
        embedder = TextEmbedder(self.tokenizer, self.text_encoder, self.config.max_sequence_length,
                                self.tokenizer_2, self.text_encoder_2)
        return embedder(prompts, device)

    # ------------------------------------------------------------------ latents
    def prepare_latents(self, batch_size, num_frames, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, *latent_shape(self.vae, num_frames, height, width))  # (B, C, T', H', W')
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for an effective batch of {batch_size}")
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _set_timesteps(self, num_inference_steps: int, num_frames: int, height: int, width: int, device):
        config = self.scheduler.config
        if config.get("use_dynamic_shifting", False):
            _, *latent_size = latent_shape(self.vae, num_frames, height, width)
            mu = shift_mu(
                num_tokens(latent_size, self.transformer.config.patch_size),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
            self.scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def _velocity(self, latents, t, text: TextBatch, guidance_scale: float | None, frame_mask=None):
        """Velocity with classifier-free guidance (guidance_scale not None): uncond and cond rows of `text` run
        as one batch. Without guidance only the cond rows run. A frame-conditioned transformer gets the given-frame
        mask channel (`frame_mask`, (B, 1, T, 1, 1)) in both."""
        if guidance_scale is not None and text.uncond is None:
            raise ValueError("guidance_scale rose above 1 during sampling, but the call began without guidance, so "
                             "no negative prompt was encoded")
        if guidance_scale is None and text.uncond is not None:
            text = text.cond_rows()
        pooled_dim = self.transformer.config.pooled_dim
        if pooled_dim and text.pooled is None:
            raise ValueError(f"the transformer takes a pooled text vector (pooled_dim={pooled_dim}); the prompt "
                             "embeddings have none")
        dtype = self.transformer.dtype
        if frame_mask is not None:
            latents = frame_conditioned_input(latents, frame_mask)  # (B, C + 1, T, H, W)
        x = latents if guidance_scale is None else torch.cat([latents, latents])
        timestep = t.expand(x.shape[0]).to(dtype=torch.float32)
        v = self.transformer(
            hidden_states=x.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text.states.to(dtype),
            encoder_attention_mask=text.mask,
            pooled_projections=text.pooled.to(dtype) if pooled_dim else None,
            return_dict=False,
        )[0].float()
        if guidance_scale is None:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: TextEmbeddings | torch.Tensor | None = None,
        negative_prompt_embeds: TextEmbeddings | torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        image=None,
        video=None,
    ):
        r"""Generate videos for `prompt`; unset settings come from `generation_defaults`.

        `image`: the first frame to animate (image-to-video). One image for every prompt, or one per prompt: a PIL
        image, or an array/tensor (H, W, 3) or (3, H, W) (a batch: a list, or (B, H, W, 3) / (B, 3, H, W)),
        uint8 or float in [0, 1]. `video`: the start of the clip to extend, frames as a list of PIL images or an
        array/tensor (F, H, W, 3) or (F, 3, H, W) (a batch: a list of those, or 5-D). Channels are last when the
        last axis has 3 entries. Given frames are resized to cover (height, width) with their aspect kept, then
        centre-cropped (`t2v.data.video.cover_and_crop`, the rule of training clips). Of a video, the first
        1 + ft (k - 1) frames are given, the most that fill whole latent frames (k of them; ft is the VAE's
        temporal factor), and at least one latent frame must remain to generate. `num_frames` is the total
        length, given frames included; the output starts with their decoded reconstruction.
        """
        settings = self.generation_settings(num_frames=num_frames, height=height, width=width,
                                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        num_frames, height, width = settings["num_frames"], settings["height"], settings["width"]
        steps, guidance_scale = settings["num_inference_steps"], settings["guidance_scale"]

        # 1. check inputs (embeddings as one tensor, as diffusers pipelines take them: every token real, no pooled)
        prompt_embeds, negative_prompt_embeds = (
            TextEmbeddings(states=e, mask=None, pooled=None) if isinstance(e, torch.Tensor) else e
            for e in (prompt_embeds, negative_prompt_embeds)
        )
        self.check_inputs(prompt, negative_prompt, num_frames, height, width, prompt_embeds, negative_prompt_embeds,
                          steps, guidance_scale, num_videos_per_prompt, output_type,
                          callback_on_step_end_tensor_inputs)
        if image is not None or video is not None:
            self.check_frame_conditioning(image, video)
        self._guidance_scale, self._interrupt, self._current_timestep = guidance_scale, False, None
        device = self._execution_device

        # 2. encode prompt (and the negative prompt for classifier-free guidance)
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode_prompt(prompts, device)
        batch = prompt_embeds.states.shape[0]
        cond = _repeat(prompt_embeds, num_videos_per_prompt)
        uncond = None
        if self.do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negatives = negative_prompt if negative_prompt is not None else ""
                negatives = [negatives] * batch if isinstance(negatives, str) else list(negatives)
                negative_prompt_embeds = self.encode_prompt(negatives, device)
            uncond = _repeat(negative_prompt_embeds, num_videos_per_prompt)

        # 3. timesteps (shifted by the token count when the scheduler shifts dynamically, as training does)
        timesteps = self._set_timesteps(steps, num_frames, height, width, device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        # 4. latents (and the given frames, encoded, with their mask)
        latents = self.prepare_latents(
            batch * num_videos_per_prompt, num_frames, height, width, torch.float32, device, generator, latents
        )
        given, frame_mask = None, None
        if image is not None or video is not None:
            given, frame_mask = self.prepare_given_frames(image, video, batch, num_videos_per_prompt, num_frames,
                                                          height, width, device)
        elif self.transformer.config.frame_conditioning:  # nothing given: text-to-video, an all-zero mask
            frame_mask = first_frames_mask(torch.zeros(latents.shape[0], dtype=torch.long, device=device),
                                           latents.shape[2])

        def hold(x):  # the given frames stay clean at every step, as in training
            return x if given is None else impose_frames(x, given, frame_mask)

        # 5. denoise (the callback may change the guidance of the steps left, or interrupt)
        text = _text_batch(cond, uncond, cut_padding=self.transformer.config.mask_text_padding)
        self._num_timesteps = len(timesteps)
        latents = hold(latents)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                self._current_timestep = t
                v = self._velocity(latents, t, text, self._guidance_scale if self.do_classifier_free_guidance else None,
                                   frame_mask)
                latents = hold(self.scheduler.step(v, t, latents, return_dict=False)[0])
                if callback_on_step_end is not None:
                    tensors = {"latents": latents}
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = hold(outputs.pop("latents", latents))
                progress_bar.update()
        self._current_timestep = None

        # 6. decode
        if output_type == "latent":
            video = latents
        else:
            z = denormalize_latents(self.vae, latents).to(self.vae.dtype)
            video = self.vae.decode(z, return_dict=False)[0].float()  # (B, 3, F, H, W) in [-1, 1]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return T2VPipelineOutput(frames=video)


def given_pixels(image, video, height: int, width: int) -> torch.Tensor:
    """`image` or `video` (as `T2VPipeline.__call__` takes them) as (N, 3, F, height, width) floats in [-1, 1],
    resized to cover (height, width) and centre-cropped (`cover_and_crop`)."""
    name, value = ("image", image) if image is not None else ("video", video)
    dims = 3 if name == "image" else 4  # the axes of one image (H, W, 3) or one video (F, H, W, 3)
    items = _given_items(value, name, dims)
    clips = [cover_and_crop(_as_frames(item, name, dims), height, width) for item in items]  # (F, 3, H, W) each
    if len({clip.shape[0] for clip in clips}) > 1:
        raise ValueError(f"the given videos have different frame counts {[clip.shape[0] for clip in clips]}")
    return rearrange(torch.stack(clips), "n f c h w -> n c f h w") * 2 - 1


def _given_items(value, name: str, dims: int) -> list:
    """The given images or videos one by one: a list of frames of PIL images is one video, any other list a
    batch, an array with one more axis than an item a batch, anything else one item."""
    if isinstance(value, PIL.Image.Image):
        return [value]
    if isinstance(value, list):
        if not value:
            raise ValueError(f"`{name}` is an empty list")
        return [value] if name == "video" and isinstance(value[0], PIL.Image.Image) else value
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim == dims + 1:
            return list(value)
        if value.ndim == dims:
            return [value]
    raise ValueError(f"`{name}` must be {'a PIL image' if dims == 3 else 'a list of PIL images'} or an array or "
                     f"tensor of {dims} axes (or a batch of them), got {_describe(value)}")


def _as_frames(item, name: str, dims: int) -> torch.Tensor:
    """One image or video as (F, 3, h, w) float32 in [0, 1] (an image is one frame)."""
    if isinstance(item, PIL.Image.Image):
        item = np.array(item.convert("RGB"))
    elif isinstance(item, list) and item and all(isinstance(frame, PIL.Image.Image) for frame in item):
        item = np.stack([np.array(frame.convert("RGB")) for frame in item])
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, torch.Tensor) or item.ndim != dims:
        raise ValueError(f"each `{name}` must have {dims} axes ({'(H, W, 3)' if dims == 3 else '(F, H, W, 3)'} or "
                         f"channels first), got {_describe(item)}")
    x = item.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"`{name}` floats must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    else:
        raise ValueError(f"`{name}` must be uint8, or float in [0, 1], got {x.dtype}")
    if x.shape[-1] == 3:  # channels last
        x = x.movedim(-1, -3)
    elif x.shape[-3] != 3:
        raise ValueError(f"`{name}` has shape {tuple(x.shape)}: 3 colour channels neither last nor before (H, W)")
    return x if dims == 4 else x[None]


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__


@dataclass
class TextBatch:
    """The text input of every denoising step: the uncond rows (if any), then the cond rows."""

    states: torch.Tensor  # (B', L, D)
    mask: torch.Tensor | None  # (B', L) bool; None = attend to every token
    pooled: torch.Tensor | None  # (B', Dp)
    uncond: int | None  # how many rows are uncond; None = no guidance rows

    def cond_rows(self) -> TextBatch:
        n = self.uncond or 0
        return TextBatch(self.states[n:], None if self.mask is None else self.mask[n:],
                         None if self.pooled is None else self.pooled[n:], None)


def _text_batch(cond: TextEmbeddings, uncond: TextEmbeddings | None, cut_padding: bool = True) -> TextBatch:
    """The text input of every denoising step, built once. With `cut_padding` (a transformer that masks padding)
    the states are cut after the last column that is a real token in some row (the columns dropped are padding
    everywhere, so attention over them changes nothing), and the mask is None when every remaining token is
    real, so that cross-attention runs unmasked (the fast SDPA kernels). Without it every column is kept and no
    mask is given: the transformer attends to its padding, as it was trained to."""
    parts = [cond] if uncond is None else [uncond, cond]
    states = torch.cat([part.states for part in parts])  # (B', L, D)
    pooled = None if any(part.pooled is None for part in parts) else torch.cat([part.pooled for part in parts])
    n_uncond = None if uncond is None else uncond.states.shape[0]
    if not cut_padding:
        return TextBatch(states, None, pooled, n_uncond)
    mask = torch.cat([_mask(part) for part in parts])  # (B', L)
    real = mask.any(dim=0).nonzero()
    length = int(real.max()) + 1 if len(real) else mask.shape[1]
    mask = mask[:, :length]
    return TextBatch(states[:, :length], None if bool(mask.all()) else mask, pooled, n_uncond)


def _mask(embeds: TextEmbeddings) -> torch.Tensor:
    """The (B, L) bool mask; a missing one means every token is real."""
    if embeds.mask is None:
        return torch.ones(embeds.states.shape[:2], dtype=torch.bool, device=embeds.states.device)
    return embeds.mask.bool()


def _repeat(embeds: TextEmbeddings, n: int) -> TextEmbeddings:
    if n == 1:
        return embeds
    return TextEmbeddings(
        states=embeds.states.repeat_interleave(n, dim=0),
        mask=_mask(embeds).repeat_interleave(n, dim=0),
        pooled=None if embeds.pooled is None else embeds.pooled.repeat_interleave(n, dim=0),
    )


__all__ = ["T2VPipeline", "T2VPipelineOutput", "GENERATION_SETTINGS", "SAMPLER_DEFAULTS"]

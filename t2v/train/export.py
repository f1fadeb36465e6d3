"""Turn trained components into a diffusers pipeline folder that `T2VPipeline.from_pretrained` loads."""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from collections.abc import Callable

from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

from t2v.config import Config, FlowConfig
from t2v.eval.retriever import RETRIEVER_CONFIG
from t2v.models.text_encoder import MINILM
from t2v.train.trainable import has_lora, merge_lora


def flow_scheduler(flow: FlowConfig) -> FlowMatchEulerDiscreteScheduler:
    """The sampler's schedule with training's shift (`t2v.flow.flow_shift`): the pipeline passes mu =
    `shift_mu` of the token count to a dynamic schedule, whose shift is then exp(mu); else the fixed shift."""
    if flow.dynamic_shift:
        return FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=flow.base_shift,
            max_shift=flow.max_shift,
            base_image_seq_len=flow.base_seq_len,
            max_image_seq_len=flow.max_seq_len,
        )
    return FlowMatchEulerDiscreteScheduler(shift=flow.shift)


def build_pipeline(cfg: Config, transformer, vae, embedder, for_saving: bool = False):
    """A `T2VPipeline` over the given modules, which encodes prompts as `embedder` does; its saved generation
    defaults are the training clip shape and frame rate and the validation sampler settings.

    With `for_saving`, the pip-installed "minilm" encoder is referenced by name instead of copied.
    """
    from t2v.pipelines import T2VPipeline

    by_name = for_saving and cfg.model.text_encoder == MINILM
    defaults = {
        "num_frames": cfg.data.frames,
        "height": cfg.data.height,
        "width": cfg.data.width,
        "fps": int(round(cfg.data.fps)),
        "num_inference_steps": cfg.train.validation_steps,
        "guidance_scale": cfg.train.validation_guidance_scale,
    }
    return T2VPipeline(
        vae=vae,
        transformer=transformer,
        scheduler=flow_scheduler(cfg.flow),
        text_encoder=None if by_name else embedder.encoder,
        tokenizer=None if by_name else embedder.tokenizer,
        text_encoder_2=embedder.encoder_2,
        tokenizer_2=embedder.tokenizer_2,
        text_encoder_source=MINILM if by_name else None,
        max_sequence_length=embedder.max_length,
        generation_defaults=defaults,
    )


def export_pipeline(cfg: Config, transformer, vae, embedder, out_dir: str) -> str:
    """Save the pipeline to `out_dir` atomically (LoRA folded into a copy of the transformer).

    A LoRA-trained transformer's adapter is also written beside `out_dir`, as diffusers'
    `pytorch_lora_weights.safetensors` that `T2VPipeline.load_lora_weights` applies to the base model; not when
    `model.trainable` also trained whole parameters, which the adapter alone would leave out.
    """
    if has_lora(transformer):
        if not cfg.model.trainable:
            from t2v.pipelines.lora import save_lora_file

            save_lora_file(transformer, os.path.join(os.path.dirname(os.path.abspath(out_dir)), LORA_WEIGHT_NAME_SAFE))
        transformer = merge_lora(copy.deepcopy(transformer))
    pipe = build_pipeline(cfg, transformer, vae, embedder, for_saving=True)
    return save_atomically(pipe, out_dir)


def save_atomically(model, out_dir: str, finish: Callable[[str], None] | None = None) -> str:
    """`model.save_pretrained` into a temporary sibling of `out_dir`, `finish(tmp)` if given, then swap it in.

    An existing `out_dir` must be a saved model (config.json or model_index.json) or empty: it is replaced, so
    pointing this at a folder of other things is refused. The old folder is renamed aside before the new one is
    renamed in, so an interruption leaves either the old or the new folder under the final name, never a
    half-written or half-deleted one; a failed save removes its temporary folder.
    """
    given, out_dir = out_dir, os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"output {out_dir!r} exists and is not a folder")
        marks = {"config.json", "model_index.json", RETRIEVER_CONFIG}
        if os.listdir(out_dir) and not marks & set(os.listdir(out_dir)):
            raise FileExistsError(
                f"output {out_dir!r} exists and is not a saved model (no {', '.join(sorted(marks))}); "
                "it would be replaced, so choose a new or model folder"
            )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{tag}")
    old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{tag}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if finish is not None:
            finish(tmp)
        if os.path.exists(out_dir):
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if os.path.exists(old):  # put the old folder back under its name
                os.replace(old, out_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return given

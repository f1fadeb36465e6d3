"""Typed training configuration.

The dataclasses below are the schema and hold every default. A YAML file only overrides them, and
command-line `key=value` strings override the YAML; both go through OmegaConf's structured, struct
mode, so a misspelt key is an error naming it. The resolved config is written into the run folder.

    cfg = load_config("configs/train/debug.yaml", ["train.max_steps=40", "data.manifest=clips.csv"])
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

SOURCES = ("manifest", "cache", "shapes")
SHAPES_WORDINGS = ("base", "wide")  # t2v.data.shapes.WORDINGS
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("bf16", "fp32", "fp16")
BACKENDS = ("none", "ddp", "deepspeed")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")
RECONSTRUCTION_LOSSES = ("l1", "l2")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be in [{low}, {high}]")


@dataclass
class ModelConfig:
    # DiT: a preset name ("tiny" -> t2v/models/configs/dit_tiny.yaml), a YAML of constructor arguments, or a
    # save_pretrained folder.
    dit: str = "tiny"
    # VAE: a preset name, a YAML, a CausalVideoVAE folder or a diffusers AutoencoderKLWan folder.
    vae: str = "tiny"
    # Text encoders: "minilm", "tiny-random", a local path or a hub id; text_encoder_2 "" = none.
    text_encoder: str = "tiny-random"
    text_encoder_2: str = ""
    # dtype the text encoders run in: fp32, bf16 or fp16 (fp16 only on a GPU).
    text_encoder_dtype: str = "fp32"
    max_text_length: int = 77
    gradient_checkpointing: bool = False
    # LoRA rank; 0 trains the full model.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0 means alpha = rank
    # Module-name suffixes LoRA adapts (PEFT matches a name equal to or ending in "." + suffix). The defaults are
    # every projection of every VideoDiT block and nothing else (embedders, adaLN and the final layer keep their
    # weights): self-attention's fused to_qkv and to_out, cross-attention's to_q, fused to_kv and to_out, and the
    # MLP's two linears mlp.0, mlp.2. The MLP is included because it holds about two thirds of a block's weights,
    # where new content and style are learnt (video LoRA trainers for Wan and HunyuanVideo adapt it too); at a
    # small rank it adds few parameters. One LoRA on a fused projection shares its A across q, k, v (or k, v).
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_qkv", "to_out", "to_q", "to_kv", "mlp.0", "mlp.2"]
    )
    # Parameter-name prefixes to train (on top of LoRA weights when lora_rank > 0); [] = all (or only LoRA).
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"model.lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tune)")
        if self.max_text_length < 1:
            raise ValueError(f"model.max_text_length={self.max_text_length} must be >= 1")
        _check_choice("model.text_encoder_dtype", self.text_encoder_dtype, MIXED_PRECISION)


@dataclass
class BucketConfig:
    frames: int = 17
    height: int = 64
    width: int = 64
    batch_size: int = 2


@dataclass
class ConditionFramesConfig:
    """Given frames in DiT training; needs a DiT with frame_conditioning (t2v.models.dit.add_frame_conditioning).

    Per sample: the first latent frame is given with `image_prob` (image-to-video), the first k latent frames
    with `extend_prob` (extension, k uniform in [extend_min, extend_max]), otherwise none (text-to-video). A
    causal VAE's first k latent frames are its first 1 + r (k - 1) video frames (r: temporal ratio), and a
    still image encodes to a clip's first latent frame. The loss covers only the frames not given.
    """

    image_prob: float = 0.0
    extend_prob: float = 0.0
    extend_min: int = 2
    extend_max: int = 3

    def __post_init__(self):
        _check_range("data.condition_frames.image_prob", self.image_prob, 0.0, 1.0)
        _check_range("data.condition_frames.extend_prob", self.extend_prob, 0.0, 1.0)
        if self.image_prob + self.extend_prob > 1 + 1e-9:  # room for rounding in e.g. 0.7 + 0.3
            raise ValueError(f"data.condition_frames.image_prob={self.image_prob} + extend_prob={self.extend_prob} "
                             f"must be <= 1")
        if not 1 <= self.extend_min <= self.extend_max:
            raise ValueError(f"data.condition_frames.extend_min={self.extend_min} and extend_max={self.extend_max} "
                             f"must satisfy 1 <= extend_min <= extend_max")

    @property
    def enabled(self) -> bool:
        return self.image_prob > 0 or self.extend_prob > 0


@dataclass
class ShapesDataConfig:
    """The Shapes World source's own options (data.source=shapes; t2v.data.shapes renders it)."""

    canonical_prob: float = 0.5  # share of canonical captions (the rest paraphrased)
    wordings: str = "base"  # paraphrase tables: "base", or "wide" (more synonyms and sentence frames)
    two_object_prob: float = 0.5  # share of two-object clips

    def __post_init__(self):
        _check_range("data.shapes.canonical_prob", self.canonical_prob, 0.0, 1.0)
        _check_choice("data.shapes.wordings", self.wordings, SHAPES_WORDINGS)
        _check_range("data.shapes.two_object_prob", self.two_object_prob, 0.0, 1.0)


@dataclass
class DataConfig:
    source: str = "manifest"  # manifest | cache | shapes
    manifest: str = ""  # CSV/JSONL with path, caption columns
    eval_manifest: str = ""  # held-out manifest the retriever task scores (R@K) at validation; "" = none
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> manifest column
    cache: str = ""  # LatentCache folder (source=cache)
    frames: int = 17
    height: int = 64
    width: int = 64
    fps: float = 8.0
    # Shape buckets; [] = one bucket of (frames, height, width, batch_size).
    buckets: list[BucketConfig] = field(default_factory=list)
    batch_size: int = 2
    caption_dropout: float = 0.1
    num_workers: int = 0
    # The Shapes World source's options (source=shapes).
    shapes: ShapesDataConfig = field(default_factory=ShapesDataConfig)
    # Share of 1-frame (image) batches in VAE training with source=shapes.
    image_batch_prob: float = 0.0
    # VAE training: random windows of this many frames (1 + k * temporal ratio; 0 = whole clips), far cheaper
    # than whole clips while still training the temporal path.
    crop_frames: int = 0
    # DiT training: given first frames (image-to-video, extension), see ConditionFramesConfig.
    condition_frames: ConditionFramesConfig = field(default_factory=ConditionFramesConfig)

    def __post_init__(self):
        _check_choice("data.source", self.source, SOURCES)
        _check_range("data.caption_dropout", self.caption_dropout, 0.0, 1.0)
        if self.shapes != ShapesDataConfig() and self.source != "shapes":
            changed = {k: v for k, v in vars(self.shapes).items() if v != getattr(ShapesDataConfig(), k)}
            raise ValueError(f"data.shapes {changed} sets the Shapes World stream; it needs data.source=shapes, "
                             f"got {self.source!r}")
        _check_range("data.image_batch_prob", self.image_batch_prob, 0.0, 1.0)
        for name in ("frames", "height", "width", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.crop_frames < 0:
            raise ValueError(f"data.crop_frames={self.crop_frames} must be >= 0 (0 = whole clips)")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # Wall-clock budget of this launch in minutes (0 = none): the run then ends as at max_steps, with a final
    # checkpoint and export. For fixed-time budgets; a resumed run gets the budget again.
    max_minutes: float = 0.0
    seed: int = 0
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (after warm-up)
    grad_clip: float = 1.0  # 0 = no clipping
    grad_accum: int = 1
    ema_decay: float = 0.0  # 0 = no EMA
    mixed_precision: str = "bf16"  # bf16 | fp32 (| fp16 on CUDA only)
    # torch.compile each transformer block of the trained model (DiT only) before the loop, as torchtitan does.
    # The first step pays the compilation, and the first validation another (no grad, other batch shapes).
    # Backend none or ddp.
    compile: bool = False
    log_every: int = 10
    ckpt_every: int = 500  # 0 = only at the end
    keep_last: int = 3
    # How checkpoints are written: "sharded" (each rank writes a share of the whole tensors; distributed.backend
    # deepspeed only), "full" (rank 0 writes everything), "auto" (sharded under deepspeed, else full). Both
    # hold the same whole tensors and resume on any process count and backend.
    checkpoint_format: str = "auto"
    validate_every: int = 0  # 0 = only once, at the end
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 20
    validation_guidance_scale: float = 5.0
    # Video-text scorer for the validation videos ("retriever:PATH", "clip:PATH", "xclip:PATH"; "" = none):
    # logs text-to-video / video-to-text retrieval metrics of the validation prompts.
    validation_scorer: str = ""
    # Shapes World read-back at each validation: this many prompts per category of the evaluation set
    # (`make_prompts(0, n)`, seeds 0, 1, ...), generated in memory; logs val/shapes/{category}/{attribute}.
    validation_shapes: int = 0
    max_nonfinite_steps: int = 10

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be >= 1")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas={list(self.betas)} must have exactly two values")
        _check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("train.checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        _check_range("train.ema_decay", self.ema_decay, 0.0, 1.0)
        for name in ("grad_accum", "log_every", "keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.max_minutes < 0:
            raise ValueError(f"train.max_minutes={self.max_minutes} must be >= 0 (0 = no time limit)")
        for name in ("warmup_steps", "ckpt_every", "validate_every", "validation_shapes"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")


@dataclass
class FlowConfig:
    # Training sigmas: sigmoid(N(logit_mean, logit_std)), then shifted by shift*s / (1 + (shift-1)*s).
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # dynamic_shift: shift = exp(mu), mu linear in the latent token count through (base_seq_len,
    # base_shift) and (max_seq_len, max_shift) as Flux/SD3's calculate_shift; else the fixed `shift`.
    dynamic_shift: bool = True
    shift: float = 1.0
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def __post_init__(self):
        if self.logit_std <= 0:
            raise ValueError(f"flow.logit_std={self.logit_std} must be > 0")
        if self.shift <= 0:
            raise ValueError(f"flow.shift={self.shift} must be > 0")
        if self.max_seq_len <= self.base_seq_len:
            raise ValueError(f"flow.max_seq_len={self.max_seq_len} must exceed flow.base_seq_len={self.base_seq_len}")


@dataclass
class VAELossConfig:
    reconstruction: str = "l1"  # l1 | l2
    temporal_weight: float = 0.5  # weight of the frame-difference reconstruction term
    # Weight of the spatial-gradient term: the same distance between horizontal and vertical pixel
    # differences of reconstruction and input (a gradient-difference loss), which penalises blurred edges.
    spatial_weight: float = 0.0
    kl_weight: float = 1e-6
    # Hard-pixel term: mean error of the worst `hard_pixel_fraction` of pixels per sample, times its weight.
    # Small objects cover a few percent of a frame; without it the loss is mostly background.
    hard_pixel_weight: float = 0.0
    hard_pixel_fraction: float = 0.05
    # Detail term: absolute error weighted by the target's squared Laplacian, normalised to mean 1 over the batch
    # (isolated pixels 16x, corners 4x a straight edge; see t2v.train.vae_task.detail_error), for one-pixel features
    # that L1 and the hard-pixel term blur.
    detail_weight: float = 0.0
    eval_batches: int = 2  # held-out batches for PSNR / SSIM
    stats_batches: int = 4  # batches whose latents set scaling_factor / shift_factor

    def __post_init__(self):
        _check_choice("vae_loss.reconstruction", self.reconstruction, RECONSTRUCTION_LOSSES)
        if self.temporal_weight < 0 or self.kl_weight < 0 or self.spatial_weight < 0 or self.detail_weight < 0:
            raise ValueError(
                f"vae_loss weights temporal_weight={self.temporal_weight}, kl_weight={self.kl_weight}, "
                f"spatial_weight={self.spatial_weight}, detail_weight={self.detail_weight} must be >= 0"
            )
        if self.hard_pixel_weight < 0 or not 0 < self.hard_pixel_fraction <= 1:
            raise ValueError(
                f"vae_loss.hard_pixel_weight={self.hard_pixel_weight} must be >= 0 and "
                f"vae_loss.hard_pixel_fraction={self.hard_pixel_fraction} in (0, 1]"
            )
        if self.stats_batches < 1:
            raise ValueError(f"vae_loss.stats_batches={self.stats_batches} must be >= 1")


@dataclass
class RetrieverConfig:
    """The video-text retriever (scripts/train_retriever.py); the other tasks ignore this section."""

    # VideoEncoder constructor arguments
    sample_size: int = 64
    patch_size: int = 8
    max_frames: int = 9  # clips are subsampled uniformly to this many frames
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    embed_dim: int = 256
    # Text side: a sentence encoder ("minilm", the offline package, a local path or a hub id) and a trained head.
    text_encoder: str = "minilm"
    text_head_hidden: int = 512
    text_trainable_layers: int = 0  # last layers of the sentence encoder to fine-tune; 0 = frozen
    text_lr: float = 2e-5  # learning rate of those layers (the rest trains at train.lr)
    max_text_length: int = 64
    # Validation: held-out pairs with distinct captions, scored by R@K.
    eval_size: int = 100

    def __post_init__(self):
        for name in ("sample_size", "patch_size", "max_frames", "embed_dim", "max_text_length", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"retriever.{name}={getattr(self, name)} must be >= 1")
        if self.text_trainable_layers < 0:
            raise ValueError(f"retriever.text_trainable_layers={self.text_trainable_layers} must be >= 0 (0 = frozen)")
        if self.text_lr < 0:
            raise ValueError(f"retriever.text_lr={self.text_lr} must be >= 0")


@dataclass
class DistributedConfig:
    backend: str = "none"  # none | ddp | deepspeed
    zero_stage: int = 0
    # DeepSpeed JSON ("" = ZeRO `zero_stage` with defaults); its "auto" values are filled from this config.
    deepspeed_config: str = ""
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states on CPU
    offload_params: bool = False  # ZeRO-3 parameter offload to CPU
    sequence_parallel_size: int = 1

    def __post_init__(self):
        _check_choice("distributed.backend", self.backend, BACKENDS)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"distributed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        deepspeed_only = {"zero_stage": self.zero_stage != 0, "deepspeed_config": bool(self.deepspeed_config),
                          "offload_optimizer": self.offload_optimizer, "offload_params": self.offload_params}
        if self.backend != "deepspeed" and (set_ := [k for k, on in deepspeed_only.items() if on]):
            raise ValueError(f"distributed.{set_[0]}={getattr(self, set_[0])!r} is a DeepSpeed setting; it needs "
                             f"distributed.backend=deepspeed, got {self.backend!r}")
        if self.sequence_parallel_size < 1:
            raise ValueError(f"distributed.sequence_parallel_size={self.sequence_parallel_size} must be >= 1")


@dataclass
class Config:
    output_dir: str = "runs/debug"
    resume: str = ""  # "" = fresh start, "latest" = newest complete checkpoint in output_dir, or a path
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir is empty; give the run folder")
        dist_cfg = self.distributed
        if self.train.compile and (dist_cfg.backend == "deepspeed" or dist_cfg.sequence_parallel_size > 1):
            raise ValueError(
                f"train.compile=true works with distributed.backend none or ddp and sequence_parallel_size 1, "
                f"not backend={dist_cfg.backend!r} with sequence_parallel_size={dist_cfg.sequence_parallel_size}"
            )
        if self.train.checkpoint_format == "sharded" and dist_cfg.backend != "deepspeed":
            raise ValueError(f"train.checkpoint_format=sharded needs distributed.backend=deepspeed, got "
                             f"{dist_cfg.backend!r}: without ZeRO every rank holds the whole state; use 'full' or 'auto'")

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether each rank writes its share of a checkpoint (train.checkpoint_format, "auto" resolved)."""
        return self.train.checkpoint_format == "sharded" or (
            self.train.checkpoint_format == "auto" and self.distributed.backend == "deepspeed")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides in OmegaConf struct mode; returns a checked `Config`.

    An unknown key or a badly typed value is a ValueError naming the key and where it came from.
    """
    merged = OmegaConf.structured(Config)
    OmegaConf.set_struct(merged, True)
    layers = []
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        layers.append((path, OmegaConf.load(path)))
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ValueError(f"overrides {bad} must have the form key=value")
    layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except (ConfigKeyError, ConfigAttributeError) as e:
            raise ValueError(f"unknown config key {e.full_key!r} in {origin}") from e
        except OmegaConfBaseException as e:
            raise ValueError(f"bad config value for {e.full_key!r} in {origin}: {str(e).splitlines()[0]}") from e
    config = OmegaConf.to_object(merged)
    _check_finite(config)
    return config


def _check_finite(config, prefix: str = "") -> None:
    """Every float of a (nested) dataclass config is finite: a ValueError names the first that is not."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{f.name}={value} must be a finite number")


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (loadable again by `load_config`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)

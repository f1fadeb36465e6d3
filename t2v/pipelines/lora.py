"""LoRA adapters of the transformer as diffusers files: `T2VLoraLoaderMixin` gives `T2VPipeline` diffusers'
`load_lora_weights`, `fuse_lora`, `unfuse_lora`, `set_adapters`, `unload_lora_weights`; `save_lora_file` writes
a transformer's adapter, as training's export does.

A file follows diffusers' convention (what `save_lora_weights` writes for CogVideoX or Wan): safetensors, by
default named `pytorch_lora_weights.safetensors`, holding PEFT tensors `transformer.<module>.lora_A.weight`
(rank, in) and `transformer.<module>.lora_B.weight` (out, rank), with the adapter's `LoraConfig` (rank, alpha,
target modules) in the header under "lora_adapter_metadata", so that loading restores the scale alpha / rank.
A Wan 2.1 LoRA in diffusers' names (`transformer.blocks.0.attn1.to_q.lora_A.weight`, ...) loads onto a converted
Wan transformer, its q/k/v LoRAs joined exactly into our fused projections (`t2v.models.wan_lora`). Weights are read
from local files only.
"""

from __future__ import annotations

import os
import uuid

import safetensors
import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE, LoraBaseMixin, _fetch_state_dict
from torch import nn

from t2v.models.wan_lora import is_wan_lora, wan_lora_to_video_dit

TRANSFORMER_NAME = "transformer"
StateDict = dict[str, torch.Tensor]


def lora_file(path: str | os.PathLike, weight_name: str | None = None) -> str:
    """The LoRA file that `path` names: the file itself, or `weight_name` (default pytorch_lora_weights.safetensors)
    in the folder `path`. Raises ValueError naming `path` when there is none."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        file = os.path.join(path, weight_name or LORA_WEIGHT_NAME_SAFE)
        if not os.path.isfile(file):
            raise ValueError(f"LoRA folder {path!r} has no {os.path.basename(file)}")
        return file
    raise ValueError(f"LoRA {path!r} is not a file or a folder")


def check_lora_keys(state_dict: StateDict, transformer: nn.Module, prefix: str = TRANSFORMER_NAME) -> None:
    """Raise ValueError unless every tensor is a LoRA tensor `<prefix>.<module>.lora_...` of a linear layer of
    `transformer` (diffusers would skip the others with a warning, leaving the model unchanged)."""
    if not state_dict:
        raise ValueError("LoRA state dict is empty")
    from peft.tuners.tuners_utils import BaseTunerLayer

    linears = {name for name, m in transformer.named_modules() if isinstance(m, (nn.Linear, BaseTunerLayer))}
    bad = sorted(
        key for key in state_dict
        if not key.startswith(f"{prefix}.") or ".lora_" not in key
        or key.removeprefix(f"{prefix}.").split(".lora_")[0] not in linears
    )  # fmt: skip
    if bad:
        shown = ", ".join(repr(key) for key in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"LoRA keys {shown} name no linear layer of {type(transformer).__name__} (expected "
            f"'{prefix}.<module>.lora_A.weight' / 'lora_B.weight', e.g. "
            f"'{prefix}.blocks.0.self_attns.0.to_qkv.lora_A.weight')"
        )


def adapter_state(transformer: nn.Module, adapter_name: str = "default") -> tuple[StateDict, dict]:
    """The adapter's tensors (keys without the adapter name, as PEFT saves them) and its LoraConfig as a dict."""
    from peft.utils import get_peft_model_state_dict

    configs = getattr(transformer, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"{type(transformer).__name__} has no LoRA adapter {adapter_name!r} (has {list(configs)})")
    tensors = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().contiguous() for k, v in tensors.items()}, configs[adapter_name].to_dict()


def save_lora_file(transformer: nn.Module, path: str, adapter_name: str = "default") -> str:
    """Write `transformer`'s adapter to the file `path` in diffusers' convention, atomically: into a temporary
    sibling first, then renamed over `path`, so an interruption leaves the old file or the new one."""
    tensors, config = adapter_state(transformer, adapter_name)
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    tmp_name = f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        T2VLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=tensors, weight_name=tmp_name,
                                             transformer_lora_adapter_metadata=config)
        os.replace(os.path.join(folder, tmp_name), path)
    finally:
        if os.path.exists(os.path.join(folder, tmp_name)):
            os.remove(os.path.join(folder, tmp_name))
    return path


class T2VLoraLoaderMixin(LoraBaseMixin):
    """Load LoRA layers into the `transformer` (a `VideoDiT`), as diffusers' `CogVideoXLoraLoaderMixin` does.

    `set_adapters`, `unload_lora_weights`, `get_list_adapters`, `delete_adapters` are diffusers' own
    (`LoraBaseMixin`); `fuse_lora` / `unfuse_lora` default to the transformer.
    """

    _lora_loadable_modules = [TRANSFORMER_NAME]
    transformer_name = TRANSFORMER_NAME

    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | StateDict, **kwargs
    ) -> StateDict | tuple[StateDict, dict | None]:
        """The tensors of a LoRA file (or folder holding `weight_name`), or a state dict passed in; with
        `return_lora_metadata=True` also the adapter metadata of the file's header (None if it has none)."""
        weight_name = kwargs.pop("weight_name", None)
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict):
            source = lora_file(source, weight_name)
            if not source.endswith(".safetensors"):
                raise ValueError(f"LoRA file {source!r} is not a .safetensors file")
        try:
            state_dict, metadata = _fetch_state_dict(
                pretrained_model_name_or_path_or_dict=source, weight_name=None, use_safetensors=True,
                local_files_only=True, cache_dir=None, force_download=False, proxies=None, token=None,
                revision=None, subfolder=None, user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                allow_pickle=False,
            )  # fmt: skip
        except safetensors.SafetensorError as error:
            raise ValueError(f"LoRA file {source!r} cannot be read: {error}") from None
        if is_wan_lora(state_dict):  # Wan's module names: onto a converted Wan's fused layers, scales folded in
            state_dict, metadata = wan_lora_to_video_dit(state_dict, metadata), None
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | StateDict,
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Add the adapter of a LoRA file, a folder holding `pytorch_lora_weights.safetensors` (or `weight_name`),
        or a state dict, to the transformer as `adapter_name` (default "default_0", "default_1", ...).

        Raises ValueError naming the path when there is no such file, and naming the keys when some tensor is
        not a LoRA tensor of one of the transformer's linear layers."""
        transformer = getattr(self, self.transformer_name, None)
        if transformer is None:
            raise ValueError("this pipeline has no transformer to load LoRA weights into")
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):  # not modified in place
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        check_lora_keys(state_dict, transformer)
        self.load_lora_into_transformer(state_dict, transformer=transformer, adapter_name=adapter_name,
                                        metadata=metadata, _pipeline=self, low_cpu_mem_usage=low_cpu_mem_usage,
                                        hotswap=hotswap)

    @classmethod
    def load_lora_into_transformer(
        cls, state_dict, transformer, adapter_name=None, _pipeline=None, low_cpu_mem_usage=False, hotswap=False,
        metadata=None,
    ) -> None:
        """diffusers' `PeftAdapterMixin.load_lora_adapter` with the "transformer." prefix."""
        transformer.load_lora_adapter(state_dict, network_alphas=None, adapter_name=adapter_name, metadata=metadata,
                                      _pipeline=_pipeline, low_cpu_mem_usage=low_cpu_mem_usage, hotswap=hotswap,
                                      prefix=cls.transformer_name)

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: StateDict | nn.Module | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function=None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        """diffusers' file of `transformer_lora_layers` (PEFT tensors), keys prefixed "transformer.", with the
        adapter's LoraConfig dict as header metadata."""
        if not transformer_lora_layers:
            raise ValueError("save_lora_weights needs transformer_lora_layers")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **kwargs) -> None:
        """Fold the active (or the named) adapters, times `lora_scale`, into the transformer's weights."""
        super().fuse_lora(components=components or [TRANSFORMER_NAME], lora_scale=lora_scale,
                          safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs)

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Take fused adapters back out of the transformer's weights."""
        super().unfuse_lora(components=components or [TRANSFORMER_NAME], **kwargs)

"""What is trained: frozen modules, trainable subsets, LoRA adapters (add, merge), compiled blocks."""

from __future__ import annotations

from torch import nn

from t2v.config import ModelConfig


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False).eval()
    return module


def prepare_trainable(model: nn.Module, cfg: ModelConfig) -> list[tuple[str, nn.Parameter]]:
    """Apply gradient checkpointing and LoRA, set requires_grad, return the trained (name, parameter) list.

    lora_rank > 0 adds PEFT LoRA adapters on `lora_target_modules` and trains them only; `trainable`
    name prefixes add (or, without LoRA, restrict to) fully trained parameters.
    """
    if cfg.gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing=true but {type(model).__name__} does not support it")
        model.enable_gradient_checkpointing()
    if cfg.lora_rank > 0:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha or cfg.lora_rank,
            target_modules=list(cfg.lora_target_modules),
            init_lora_weights=True,
        )
        if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin
            model.add_adapter(lora)
        else:
            inject_adapter_in_model(lora, model)
    prefixes = tuple(cfg.trainable)
    for name, param in model.named_parameters():
        if cfg.lora_rank > 0:
            param.requires_grad_("lora_" in name or (bool(prefixes) and name.startswith(prefixes)))
        else:
            param.requires_grad_(not prefixes or name.startswith(prefixes))
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"model.trainable={list(prefixes)} matches no parameter of {type(model).__name__}")
    return params


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile each block of `model.blocks` in place (as torchtitan does): one graph serves every block of
    a shape, it compiles quickly, and DDP wraps an ordinary module. Parameter names and the state dict are
    unchanged. A model without a `blocks` ModuleList (the VAEs, which the loop calls through `encode` and
    `decode`, not `__call__`) is refused rather than silently left uncompiled."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"train.compile=true compiles transformer blocks, and {type(model).__name__} has no "
                         "`blocks` list; train it with train.compile=false")
    for block in blocks:
        block.compile()
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights and put the plain layers back, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    return model

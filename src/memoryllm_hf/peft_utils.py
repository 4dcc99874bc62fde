"""PEFT helpers for MemoryLlama: the official two-adapter design (a write LoRA for injection, a read LoRA for
everything else) with named PEFT adapters, and the trainable parameters of converted official checkpoints.

Plain `get_peft_model(model, LoraConfig(...))` needs nothing from here: LoRA trains, the memory stays a buffer, and
`modules_to_save=["memory_embeddings"]` trains and saves `bos_embedding` / `new_memory_positional_emb`.
"""

import os

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .modeling import READ, WRITE, MemoryLlamaForCausalLM


class PeftRoleSwitch:
    """A role hook (see `MemoryAdapters.role_hooks`) that makes the PEFT adapter named for the role active."""

    def __init__(self, tuner: nn.Module, names: dict[str, str]):
        self.tuner, self.names = tuner, names

    def __call__(self, role: str) -> None:
        """Switch without PEFT's side effect of freezing the other adapter: a read loss must still reach the write
        adapter through freshly written memory slots."""
        trainable = [(p, p.requires_grad) for p in self.tuner.parameters()]
        self.tuner.set_adapter(self.names[role])
        for param, flag in trainable:
            param.requires_grad_(flag)


def _route_roles(peft_model: PeftModel, write: str, read: str, trainable: bool) -> PeftModel:
    model = peft_model.get_base_model()
    if not hasattr(model, "new_memory_slots"):  # also a remote-code MemoryLlama, which is another class
        raise TypeError(f"memory adapters need a MemoryLlamaForCausalLM, got {type(model).__name__}")
    hooks = model.adapters.role_hooks
    hooks[:] = [h for h in hooks if not isinstance(h, PeftRoleSwitch)]
    hooks.append(PeftRoleSwitch(peft_model.base_model, {WRITE: write, READ: read}))
    peft_model.set_adapter(read)
    peft_model.set_requires_grad([write, read], requires_grad=trainable)
    return peft_model


def add_memory_adapters(
    model: MemoryLlamaForCausalLM, lora_config: LoraConfig, write: str = "write", read: str = "read"
) -> PeftModel:
    """Add two PEFT LoRA adapters named `write` and `read` (same `lora_config`): `write` is active while
    injecting (`inject`, `new_memory_slots`), `read` for reading (forward, generate). Both are trainable unless
    `lora_config.inference_mode`. `save_pretrained(folder)` writes `folder/<write>` and `folder/<read>`; load them
    back with `load_memory_adapters`. Modules in `modules_to_save` get one copy per adapter, used in its role.
    `merge_and_unload` would merge only the read adapter (the active one), so keep the pair unmerged."""
    peft_model = get_peft_model(model, lora_config, adapter_name=write)
    peft_model.add_adapter(read, lora_config)
    return _route_roles(peft_model, write, read, trainable=not lora_config.inference_mode)


def load_memory_adapters(
    model: MemoryLlamaForCausalLM,
    folder: str | os.PathLike,
    write: str = "write",
    read: str = "read",
    is_trainable: bool = False,
) -> PeftModel:
    """Load a write/read adapter pair saved from `add_memory_adapters` and route the roles again."""
    peft_model = PeftModel.from_pretrained(
        model, os.path.join(folder, write), adapter_name=write, is_trainable=is_trainable
    )
    peft_model.load_adapter(os.path.join(folder, read), adapter_name=read, is_trainable=is_trainable)
    return _route_roles(peft_model, write, read, trainable=is_trainable)


def train_builtin_memory_parameters(model: MemoryLlamaForCausalLM, embeddings: bool = True) -> list[nn.Parameter]:
    """Freeze everything but the built-in write/read adapters (of a converted official checkpoint) and, with
    `embeddings`, the memory embeddings (`bos_embedding`, `new_memory_positional_emb`); returns those parameters."""
    if not any(".adapter_A." in name for name, _ in model.named_parameters()):
        raise ValueError("this model has no built-in memory adapters (config.lora_config is None); use PEFT LoRA")
    chosen = []
    for name, param in model.named_parameters():
        wanted = ".adapter_A." in name or ".adapter_B." in name or (embeddings and "memory_embeddings." in name)
        param.requires_grad_(wanted)
        if wanted:
            chosen.append(param)
    return chosen

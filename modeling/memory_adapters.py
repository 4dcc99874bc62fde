"""Built-in memory adapters: the write (injection) and read LoRA of MemoryLLM inside one `nn.Linear`."""

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

WRITE = "write"
READ = "read"


class AdapterWeights(nn.ParameterDict):
    """The `A` (down, [r, in]) or `B` (up, [out, r]) matrices of each named adapter."""

    def __init__(self, kind: str, shape: tuple[int, int], names: list[str], **factory):
        super().__init__({name: nn.Parameter(torch.zeros(*shape, **factory)) for name in names})
        self.kind = kind

    @torch.no_grad()
    def reset(self, names: Iterable[str] | None = None) -> None:
        """PEFT's LoRA init (a fresh adapter changes nothing): A Kaiming-uniform, B zero."""
        for name in self.keys() if names is None else names:
            if self.kind == "A":
                nn.init.kaiming_uniform_(self[name], a=math.sqrt(5))
            else:
                nn.init.zeros_(self[name])


class AdaptedLinear(nn.Linear):
    """An `nn.Linear` with named low-rank adapters; `active_adapter` picks the one added to the output.

    It stays an `nn.Linear` (same `weight`/`bias`), so PEFT can wrap it like any other linear layer.
    """

    def __init__(self, base: nn.Linear, names: list[str], r: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adapter_A = AdapterWeights("A", (r, self.in_features), names, **factory)
        self.adapter_B = AdapterWeights("B", (self.out_features, r), names, **factory)
        self.adapter_scaling = alpha / r
        self.adapter_dropout = nn.Dropout(dropout)
        self.active_adapter: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.active_adapter is None:
            return out
        low_rank = F.linear(self.adapter_dropout(x), self.adapter_A[self.active_adapter])
        return out + F.linear(low_rank, self.adapter_B[self.active_adapter]) * self.adapter_scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.adapter_A)}, active={self.active_adapter}"


class MemoryAdapters:
    """Installs the write/read adapters into a decoder and switches between them (one place for the role).

    `role_hooks` are called with the role on every switch (e.g. to switch PEFT adapters along with the built-in ones).
    """

    def __init__(self, layers: nn.ModuleList, lora_config: dict | None, separate_read: bool):
        self.modules: list[AdaptedLinear] = []
        self.names = [WRITE, READ] if separate_read else [WRITE]
        self.role_hooks: list[Callable[[str], None]] = []
        if not lora_config:
            return
        r, alpha = lora_config["r"], lora_config["lora_alpha"]
        dropout = lora_config.get("lora_dropout", 0.0)
        targets = set(lora_config["target_modules"])
        for layer in layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if name in targets and isinstance(child, nn.Linear):
                        adapted = AdaptedLinear(child, self.names, r, alpha, dropout)
                        setattr(parent, name, adapted)
                        self.modules.append(adapted)
        self._switch(READ)

    def role_name(self, role: str) -> str:
        """Adapter serving a role: the read role falls back to the write adapter when there is no separate one."""
        return role if role in self.names else WRITE

    def _switch(self, role: str) -> None:
        for module in self.modules:
            module.active_adapter = self.role_name(role)
        for hook in self.role_hooks:
            hook(role)

    @contextlib.contextmanager
    def use(self, role: str) -> Iterator[None]:
        """Activate the adapters of `role` ('write' or 'read') inside the block; reads are the default."""
        self._switch(role)
        try:
            yield
        finally:
            self._switch(READ)

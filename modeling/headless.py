"""The head-less read of MemoryLlama (`AutoModel`): `last_hidden_state` instead of logits.

`LlamaHeadless` stands in for `LlamaForCausalLM.forward` in a class's method order, so the memory model's own
`forward` (which adds the memory prefix, then calls `super().forward`) runs unchanged and ends in the base model's
output instead of the LM head. The checkpoint layout stays that of the causal LM (same weights, memory, adapters).
"""

from transformers import LlamaForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast


class LlamaHeadless(LlamaForCausalLM):
    """`forward` returns the decoder's `BaseModelOutputWithPast` (`last_hidden_state`, `cache`, ...); no logits."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if labels is not None:
            raise ValueError("a base model (AutoModel) has no LM head: use AutoModelForCausalLM for a loss")
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def generate(self, *args, **kwargs):
        raise TypeError("a base model (AutoModel) cannot generate: load it with AutoModelForCausalLM")

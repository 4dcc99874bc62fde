"""A synthetic recall task: inject "k v k v ..." (a key and its value), then ask "k" and score the value.

Every example draws a fresh random value for its key, so the value can only come from memory: without it the
best guess is 1 / num_values.
"""

import random
from dataclasses import dataclass

import torch

from .data import Example

IGNORE = -100


@dataclass
class KeyValueTask:
    num_keys: int = 8
    num_values: int = 8
    key_offset: int = 8  # keys are tokens key_offset .. key_offset + num_keys - 1
    value_offset: int = 40  # values are tokens value_offset .. value_offset + num_values - 1
    pairs: int = 1  # distinct keys per context
    context_repeats: int = 2  # the pairs are written this many times (a context should fill the K new slots)
    seed: int = 0

    def pairs_for(self, index: int) -> list[tuple[int, int]]:
        rng = random.Random(f"{self.seed}-kv-{index}")
        keys = rng.sample(range(self.num_keys), self.pairs)
        return [(self.key_offset + k, self.value_offset + rng.randrange(self.num_values)) for k in keys]

    def example(self, index: int) -> Example:
        """Context: the pairs `context_repeats` times; segment: each pair once, in another order, scored on the
        values only."""
        pairs = self.pairs_for(index)
        context = [token for pair in pairs * self.context_repeats for token in pair]
        asked = random.Random(f"{self.seed}-ask-{index}").sample(pairs, len(pairs))
        segment = torch.tensor([token for pair in asked for token in pair])
        labels = segment.clone()
        labels[0::2] = IGNORE
        return Example([torch.tensor(context)], segment, labels)

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values


@torch.no_grad()
def recall_accuracy(model, task: KeyValueTask, indices: range, use_memory: bool = True) -> float:
    """Fraction of values predicted exactly right after `model.inject(context)` into the current memory (each
    example starts from the same pool; `use_memory=False`: the same questions asked without the memory).
    The model's memory and train/eval mode are restored afterwards."""
    was_training, state = model.training, model.memory_state()
    model.eval()
    hits = total = 0
    for index in indices:
        example = task.example(index)
        model.load_memory_state(state)
        model.inject(example.contexts[0])
        logits = model(input_ids=example.segment[None].to(model.device), use_memory=use_memory).logits[0]
        labels = example.segment_labels().to(logits.device)
        scored = labels[1:] != IGNORE
        hits += int((logits[:-1].argmax(-1)[scored] == labels[1:][scored]).sum())
        total += int(scored.sum())
    model.load_memory_state(state)
    model.train(was_training)
    return hits / total

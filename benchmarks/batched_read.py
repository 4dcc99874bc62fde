"""Batched-read benchmark: Q chat questions against one full memory, asked in one batch vs one by one.

Compared side by side (greedy, the same new tokens for every variant):
* one_by_one: `generate` per question (batch of 1; the standard path, as a single question always takes);
* batched: one left-padded `generate` for all Q questions; the rows share one copy of the memory keys/values
  (`shared_prefix_attention`: prefix and rows attended separately, combined by log-sum-exp);
* batched_copy: the same batch on the old path (`share_memory_prefix = False`): every row holds its own copy of the
  memory keys/values, concatenated again at every decode step.

Run: python -m benchmarks.batched_read --model smollm2 --threads 1 --clock cpu --memory-tokens 4096 --new-tokens 8
"""

import torch

from memoryllm_hf.default_model import smollm2_base_folder
from memoryllm_hf.tiny import tiny_tokenizer

from .common import TINY, Case, Run, common_parser, fill_pool, interleaved_medians, load_model, paired_ratio

COLUMNS = (
    "N",
    "questions",
    "prompt_tokens",
    "one_by_one_s",
    "batched_s",
    "batched_copy_s",
    "batched_vs_one_by_one",
    "copy_vs_one_by_one",
    "speedup",
    "cache_MB",
    "copy_cache_MB",
    "outputs_equal",
)

QUESTIONS = (
    "What is the capital of France?",
    "Who wrote the novel Pride and Prejudice?",
    "How many legs does a spider have?",
    "What is the boiling point of water at sea level?",
    "Which planet is known as the Red Planet?",
    "What language is spoken in Brazil?",
    "Who painted the Mona Lisa?",
    "What is the largest ocean on Earth?",
)


def chat_prompts(run: Run, tokenizer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded chat prompts (ids, mask) of the first `count` questions (cycled if more are asked for)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], tokenize=False, add_generation_prompt=True
        )
        for i in range(count)
    ]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"].to(run.device), batch["attention_mask"].to(run.device)


def cache_megabytes(cache) -> float:
    """Bytes of the distinct tensors a generation cache holds (a tensor shared by several layers counted once)."""
    tensors = {}
    for layer in cache.layers:
        for name in ("prefix_keys", "prefix_values", "keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                tensors[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(tensors.values()) / 2**20


class BatchedRead:
    """Q questions against one memory: the three ways of asking them, and their outputs."""

    def __init__(self, run: Run, model, ids: torch.Tensor, mask: torch.Tensor):
        self.run, self.model, self.ids, self.mask = run, model, ids, mask
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
        new = run.args.new_tokens
        self.options = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": pad}

    def one_by_one(self) -> list[torch.Tensor]:
        answers = []
        for row, row_mask in zip(self.ids, self.mask.bool(), strict=True):
            prompt = row[row_mask][None]
            answers.append(self.model.generate(prompt, **self.options)[0, prompt.shape[1] :])
        return answers

    def batched(self, share: bool = True):
        self.model.share_memory_prefix = share
        try:
            out = self.model.generate(self.ids, attention_mask=self.mask, return_dict_in_generate=True, **self.options)
        finally:
            self.model.share_memory_prefix = True
        return out

    def answers(self, out) -> list[torch.Tensor]:
        return list(out.sequences[:, self.ids.shape[1] :])

    def row(self) -> dict:
        with torch.no_grad():
            one_by_one, batched, copy = self.one_by_one(), self.batched(), self.batched(share=False)
            cases = {
                "one_by_one": Case(self.one_by_one),
                "batched": Case(self.batched),
                "batched_copy": Case(lambda: self.batched(share=False)),
            }
            samples = {}
            seconds = interleaved_medians(self.run, cases, samples)
        equal = all(
            torch.equal(single, ours) and torch.equal(single, old)
            for single, ours, old in zip(one_by_one, self.answers(batched), self.answers(copy), strict=True)
        )
        return {
            "N": self.model.config.num_memory_tokens,
            "questions": self.ids.shape[0],
            "prompt_tokens": f"{int(self.mask.sum(1).min())}-{int(self.mask.sum(1).max())}",
            **{f"{name}_s": value for name, value in seconds.items()},
            "batched_vs_one_by_one": paired_ratio(samples, "batched", "one_by_one"),
            "copy_vs_one_by_one": paired_ratio(samples, "batched_copy", "one_by_one"),
            "speedup": paired_ratio(samples, "one_by_one", "batched"),
            "cache_MB": cache_megabytes(batched.cache),
            "copy_cache_MB": cache_megabytes(copy.cache),
            "outputs_equal": equal,
            "answers": [single.tolist() for single in one_by_one],
            "samples_s": samples,
        }


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--memory-tokens", type=int, default=4096, help="N (the pool is filled: every slot a memory)")
    parser.add_argument("--questions", type=int, default=8, help="questions asked (batch size)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per question (greedy)")
    parser.add_argument("--update-tokens", type=int, default=256, help="K (does not affect reads)")
    run = Run("batched_read", parser.parse_args(argv))
    model = load_model(run, run.args.memory_tokens, run.args.update_tokens, "input")
    fill_pool(model)
    if run.args.model == TINY:
        tokenizer = tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm2_base_folder())
    ids, mask = chat_prompts(run, tokenizer, run.args.questions)
    run.rows.append(BatchedRead(run, model, ids, mask).row())
    run.progress(run.rows[-1], COLUMNS)
    notes = [
        "X_s: seconds for all questions (median); batched_vs_one_by_one = batched / one_by_one (goal <= 0.5), "
        "copy_vs_one_by_one: the same for the old batched path (per-row copies of the memory keys/values); "
        "speedup = one_by_one / batched (ratios: medians of same-repeat ratios)",
        "cache_MB: distinct tensors held by the generation cache after generate (batched: the memory keys/values once "
        "+ the rows' own; batched_copy: a copy per row); outputs_equal: every variant generated the same tokens",
    ]
    run.finish(COLUMNS, notes)


if __name__ == "__main__":
    main()

"""Prompt formats: the paper's plain `Question: {q} Answer:` and the model's chat template.

The same builder serves every condition: `context` (in-context condition) is placed before the question; when the
prompt would not fit the model's window, the context is cut from the front (its oldest tokens go, as in the official
LongBench script) and the number of cut tokens is returned so results can say so.
"""

from dataclasses import dataclass

PROMPT_STYLES = ("plain", "chat")
QA_INSTRUCTION = "Answer the question with a short phrase, no full sentence."
COMPLETE_INSTRUCTION = "Complete the sentence."


@dataclass
class Prompt:
    ids: list[int]
    truncated_tokens: int = 0


class Prompter:
    """Token ids of prompts in one style for one tokenizer, within a window of `window` tokens."""

    def __init__(self, tokenizer, style: str, window: int):
        if style not in PROMPT_STYLES:
            raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
        if style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; use --prompt-style plain")
        self.tokenizer, self.style, self.window = tokenizer, style, window

    def _encode(self, text: str) -> list[int]:
        # Chat-template text already holds its special tokens; plain text gets the tokenizer's usual ones.
        return self.tokenizer(text, add_special_tokens=self.style == "plain")["input_ids"]

    def _chat(self, content: str) -> str:
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _question_text(self, question: str, context: str | None, instruction: str) -> str:
        lead = f"{context}\n\n" if context else ""
        if self.style == "plain":
            return f"{lead}Question: {question} Answer:"
        return self._chat(f"{lead}{instruction}\nQuestion: {question}")

    def question(
        self,
        question: str,
        context: str | None = None,
        reserve: int = 0,
        instruction: str = QA_INSTRUCTION,
        cut_as: str | None = None,
    ) -> Prompt:
        """A QA prompt; with `context`, its front is cut until the prompt plus `reserve` tokens fits the window.

        `cut_as`: cut the context as it would be cut for this question instead (the longest of a set of questions
        asked after one context), so every prompt of the set keeps the same context tokens and the prompts share
        their front (a cache of one serves the others). Where the prompt would then not fit (`question` longer than
        `cut_as`), it is cut for itself."""
        if cut_as is not None and context:
            cut = self.question(cut_as, context, reserve, instruction)
            if cut.truncated_tokens:
                context_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
                kept = self._kept(context_ids, len(context_ids) - cut.truncated_tokens)
                ids = self._encode(self._question_text(question, kept, instruction))
                if len(ids) + reserve <= self.window:
                    return Prompt(ids, truncated_tokens=cut.truncated_tokens)
        ids = self._encode(self._question_text(question, context, instruction))
        if not context or len(ids) + reserve <= self.window:
            return Prompt(ids)
        context_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        keep = len(context_ids)
        while len(ids) + reserve > self.window and keep > 0:
            keep = max(0, keep - (len(ids) + reserve - self.window))
            ids = self._encode(self._question_text(question, self._kept(context_ids, keep), instruction))
        if len(ids) + reserve > self.window:
            raise ValueError(f"the question alone needs {len(ids) + reserve} tokens, over the {self.window} window")
        return Prompt(ids, truncated_tokens=len(context_ids) - keep)

    def _kept(self, context_ids: list[int], keep: int) -> str | None:
        """The text of the last `keep` context tokens (None for none)."""
        return self.tokenizer.decode(context_ids[len(context_ids) - keep :]) if keep else None

    def completion(
        self, prompt: str, target: str, kind: str, context: str | None = None
    ) -> tuple[list[int], list[int]]:
        """(prefix ids, target ids) scoring `target` as the continuation of `prompt`.

        kind "sentence": `prompt` is a sentence start (CounterFact); "question": a question (zsRE). In chat style a
        sentence is completed inside the assistant turn, a question is answered by it.
        """
        if kind not in ("sentence", "question"):
            raise ValueError(f"kind must be 'sentence' or 'question', got {kind!r}")
        lead = f"{context}\n" if context else ""
        if self.style == "plain":
            prefix = f"{lead}{prompt}" if kind == "sentence" else f"{lead}Question: {prompt} Answer:"
            return self._encode(prefix), self.tokenizer(f" {target}", add_special_tokens=False)["input_ids"]
        if kind == "sentence":
            prefix = self._chat(f"{lead}{COMPLETE_INSTRUCTION}\n{prompt}") + prompt
            return self._encode(prefix), self.tokenizer(f" {target}", add_special_tokens=False)["input_ids"]
        prefix = self._chat(f"{lead}{QA_INSTRUCTION}\nQuestion: {prompt}")
        return self._encode(prefix), self.tokenizer(target, add_special_tokens=False)["input_ids"]

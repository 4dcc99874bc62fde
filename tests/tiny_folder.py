"""A tiny MemoryLlama folder with a real tokenizer (word level, trained offline in milliseconds) for text tests."""

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memoryllm_hf.tiny import tiny_model

SENTENCES = [
    "Alice lives in Paris and works as a baker.",
    "Bob keeps three cats; the oldest one is called Pepper!",
    "The meeting moved to Thursday at 10 am.\nBring the blue folder.",
    "What does Alice do? Where does Bob live? Who is Pepper?",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Words and single characters (spaces included) as tokens; ids 0-3 are pad, bos, eos, unk like the tiny
    config, and the whole vocabulary fits its 128 ids."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_folder(path: Path, chat_template: bool = True, **config_overrides) -> Path:
    """Save a tiny random MemoryLlama with the tiny tokenizer to `path` (a folder the CLI can load)."""
    tiny_model(**config_overrides).save_pretrained(path)
    tiny_tokenizer(chat_template).save_pretrained(path)
    return path

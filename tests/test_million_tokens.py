"""`benchmarks.million_tokens` on the tiny model and a tiny data folder: the stream's order and contents, a build
killed part-way and resumed equals one run straight through, and the records and report it writes."""

import json
import sys
from pathlib import Path

import pytest

from memoryllm_hf.loading import load
from memoryllm_hf.modeling import MemoryLlamaForCausalLM
from memoryllm_hf.modeling.memory_store import store_content_hash

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
million = pytest.importorskip("benchmarks.million_tokens")

SHARED = "the shared passage about owls."


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """SQuAD: 3 questions (two share a passage) of articles A and B; NQ: 2 questions of titles T1, T2; unrelated
    texts that must be left out say "LEAVE" (a question's article or title, or a question's passage)."""
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "squad_qa.jsonl", [
        {"question": "what do owls eat?", "context": SHARED, "answers": ["mice"], "article": "A"},
        {"question": "where do owls sleep?", "context": SHARED, "answers": ["trees"], "article": "A"},
        {"question": "who built the bridge?", "context": "the bridge was built by ann.", "answers": ["ann"],
         "article": "B"},
    ])
    write_jsonl(folder / "nq_qa.jsonl", [
        {"question": "when did the river flood?", "context": "the river flooded in may.", "answers": ["may"],
         "title": "T1"},
        {"question": "what colour is the fox?", "context": "the fox is red.", "answers": ["red"], "title": "T2"},
    ])
    write_jsonl(folder / "squad_paragraphs.jsonl", [
        {"text": "LEAVE a paragraph of article A.", "article": "A"},
        {"text": "keep: a paragraph of article C.", "article": "C"},
    ])
    write_jsonl(folder / "nq_passages.jsonl", [
        {"text": "LEAVE a passage titled T1.", "title": "T1"},
        {"text": "keep: a passage of title T3.", "title": "T3"},
        {"text": "keep: a passage of title T3.", "title": "T3"},  # a duplicate
    ])
    write_jsonl(folder / "hotpotqa.jsonl", [
        {"question": "q", "answer": "a", "paragraphs": [
            {"title": "B", "text": "LEAVE a paragraph titled like article B."},
            {"title": "H1", "text": SHARED},  # LEAVE: a question's passage
            {"title": "H2", "text": "keep: hotpot paragraph two about the moon and the stars."},
        ]},
    ])
    return folder


class CharTokenizer:
    """One id per character (ids >= 1): enough to build and read streams without a model."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_stream_passages_first_deduplicated_and_no_question_text_unrelated(data):
    tokenizer = CharTokenizer()
    filler = [{"text": f"filler prose number {i}.", "source": "test"} for i in range(100)]
    items = million.build_stream(tokenizer, data, 600, 30, filler=lambda: iter(filler))
    kinds = [item.kind for item in items]
    # passages, then unrelated dev text, then filler; each kind in one run
    assert kinds == sorted(kinds, key=["passage", "unrelated", "filler"].index)
    passages = [item for item in items if item.kind == "passage"]
    # alternating SQuAD, NQ; the shared passage once, owning both questions
    assert [tokenizer.decode(p.ids) for p in passages] == [
        SHARED, "the river flooded in may.", "the fox is red.", "the bridge was built by ann."]
    assert passages[0].owners == [("squad", 0), ("squad", 1)]
    assert passages[1].owners == [("nq", 0)]
    unrelated = "".join(tokenizer.decode(item.ids) for item in items if item.kind == "unrelated")
    assert "LEAVE" not in unrelated and SHARED not in unrelated
    assert unrelated.count("keep: a passage of title T3.") == 1  # the duplicate once (contexts: 30 tokens)
    for text in ("article C", "title T3", "hotpot paragraph two"):
        assert text in unrelated
    assert all(len(item.ids) == 30 for item in items if item.kind != "passage")  # contexts of --context-tokens
    assert sum(len(item.ids) for item in items) >= 600 and kinds[-1] == "filler"
    # filler only where the dev data runs out
    short = million.build_stream(tokenizer, data, 50, 30, filler=lambda: iter(filler))
    assert "filler" not in {item.kind for item in short}


BUILD = ["build", "--model", "tiny", "--style", "plain", "--target-tokens", "700", "--store-tokens", "2048",
         "--context-tokens", "48", "--checkpoints", "100", "200", "--copy-at", "20", "--save-every", "4",
         "--timing-questions", "2", "--timing-new-tokens", "2", "--min-free-gb", "0"]
# fields of a record that depend on the machine or the clock, not on the stream and the memory
VARIABLE = ("timing", "memory", "disk", "build", "meta")


def comparable(record: dict) -> dict:
    out = {key: value for key, value in record.items() if key not in VARIABLE}
    out["recall"] = {scorer: {k: v for k, v in rows.items() if k not in ("seconds_per_question",
                                                                          "memory_with_features")}
                     for scorer, rows in record["recall"].items()}
    out["run"] = record["run"].split("-", 1)[1]  # the folder name differs
    return out


def memory_of(folder: Path) -> tuple:
    model, _ = load(str(folder))
    return model.num_injections, model.memory_state().content_hash(), store_content_hash(model.long_term_memory)


@pytest.mark.filterwarnings("ignore")
def test_killed_build_resumes_to_the_same_store_and_records(data, tmp_path, monkeypatch):
    common = [*BUILD, "--data", str(data)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert million.main([*common, "--folder", str(straight), "--records", str(tmp_path / "a.jsonl")]) == 0

    # a kill part-way: the 9th inject never returns (injections since the last save are lost, as in a SIGKILL)
    real, calls = MemoryLlamaForCausalLM.inject, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MemoryLlamaForCausalLM, "inject", dying)
    with pytest.raises(KeyboardInterrupt):  # saved only at the checkpoints: the items after the last one are lost
        million.main([*common, "--folder", str(resumed), "--records", str(tmp_path / "b.jsonl"),
                      "--save-every", "1000"])
    monkeypatch.setattr(MemoryLlamaForCausalLM, "inject", real)
    progress = json.loads((resumed / million.PROGRESS_FILE).read_text())
    assert 0 < progress["position"] < 11  # the last save was at a checkpoint, before the killed item 11
    assert million.main([*common, "--folder", str(resumed), "--records", str(tmp_path / "b.jsonl")]) == 0

    assert memory_of(straight / million.STORE_DIR) == memory_of(resumed / million.STORE_DIR)
    assert memory_of(straight / million.COPY_DIR) == memory_of(resumed / million.COPY_DIR)
    a = million.load_records(tmp_path / "a.jsonl")
    b = million.load_records(tmp_path / "b.jsonl")
    assert [r["labels"] for r in a] == [["tokens>=100"], ["injections>=20"], ["tokens>=200"]]
    assert [comparable(r) for r in a] == [comparable(r) for r in b]


@pytest.fixture(scope="module")
def built(data, tmp_path_factory) -> Path:
    """A tiny build straight through (both scorers): its folder root, with the records in `records.jsonl`."""
    root = tmp_path_factory.mktemp("built")
    args = [*BUILD, "--data", str(data), "--folder", str(root / "store"), "--records", str(root / "records.jsonl"),
            "--scorers", "bm25", "model"]
    assert million.main(args) == 0
    return root


@pytest.mark.filterwarnings("ignore")
def test_records_and_report(built, tmp_path):
    records = built / "records.jsonl"
    rows = million.load_records(records)
    assert rows and all(json.loads(line) for line in records.read_text().splitlines())
    for record in rows:
        assert {"run", "labels", "position", "stored_tokens", "stored_injections", "questions_stored", "recall",
                "timing", "memory", "disk", "build", "settings"} <= set(record)
        assert record["settings"]["long_term_memory_storage"] == "disk"
        assert record["settings"]["long_term_memory_dtype"] == "bfloat16"
        for scorer in ("bm25", "model"):
            for name, n in record["questions_stored"].items():
                if n:
                    row = record["recall"][scorer][name]
                    for metric in ("recall@1", "recall@4", "read"):
                        assert row[metric]["n"] == n and 0 <= row[metric]["rate"] <= 1
                        low, high = row[metric]["ci95"]
                        assert low <= row[metric]["rate"] <= high
                    assert row["recall@1"]["rate"] <= row["recall@4"]["rate"]
        assert record["timing"]["retrieve_s"] > 0 and record["timing"]["pool_s"] > 0
        assert record["memory"]["rss"] >= record["memory"]["rss_anon"] > 0
        assert record["disk"]["store_folder"] > 0
    assert rows[0]["stored_tokens"] >= 100 and rows[-1]["stored_tokens"] >= 200
    # the tiny model stores K = 6 of every 16 tokens: the stream runs out before 700 stored tokens
    progress = json.loads((built / "store" / million.PROGRESS_FILE).read_text())
    assert progress["position"] == progress["items"] and progress["stored_tokens"] >= 200
    summary, plot = tmp_path / "summary.json", tmp_path / "plot.png"
    assert million.main(["report", "--records", str(records), "--summary", str(summary), "--plot", str(plot),
                         "--answers", str(tmp_path / "none.jsonl")]) == 0
    written = json.loads(summary.read_text())
    assert len(written["rows"]) == len(rows) and len(written["throughput"]) == len(rows) - 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def on_the_copy(command: str, data: Path, built: Path, *extra: str) -> list[str]:
    """Arguments of a subcommand run on the tiny build's 20-injection copy (`built`)."""
    return [command, "--model", "tiny", "--style", "plain", "--data", str(data), "--folder",
            str(built / "store" / million.COPY_DIR), *extra]


@pytest.mark.filterwarnings("ignore")
def test_answers_per_read_mode_and_baseline_resumable(data, built, tmp_path):
    output = tmp_path / "answers.jsonl"
    args = on_the_copy("answers", data, built, "--read-modes", "retrieve", "pool", "--questions", "2",
                       "--max-new-tokens", "2", "--output", str(output))
    assert million.main(args) == 0
    rows = million.load_records(output)
    # 2 SQuAD + 2 NQ questions, each with both read modes and the passage in the user turn (no memory)
    conditions = ("retrieve", "pool", "passage_in_user_turn")
    assert sorted((r["dataset"], r["index"], r["condition"]) for r in rows) == sorted(
        (name, i, c) for name in ("squad", "nq") for i in range(2) for c in conditions)
    assert all({"answer", "exact_hit", "f1"} <= set(r) for r in rows)
    # each record names what its own read mode read: the pool read retrieves nothing, the retrieval read what
    # `model.retrieve` chooses for the same prompt
    assert all(r["read"] is None for r in rows if r["condition"] in ("pool", "passage_in_user_turn"))
    assert all(isinstance(r["read"], list) for r in rows if r["condition"] == "retrieve")
    assert million.main(args) == 0 and len(million.load_records(output)) == len(rows)  # nothing asked twice
    summary = million.answer_summary(rows)
    assert summary["pool"]["nq"]["exact_hit"]["n"] == 2
    with pytest.raises(SystemExit, match="not one of this model's"):
        million.main([*args[:-1], str(tmp_path / "other.jsonl"), "--read-modes", "nonexistent"])
    rerank = [*args[:-1], str(tmp_path / "rerank.jsonl"), "--read-modes", "text", "--likelihood-weight", "0.05"]
    assert million.main(rerank) == 0
    assert {r["condition"] for r in million.load_records(tmp_path / "rerank.jsonl")} == {
        "text+rerank0.05", "passage_in_user_turn"}
    gated = [*args[:-1], str(tmp_path / "gated.jsonl"), "--read-modes", "text@bm25", "--subject-gate"]
    assert million.main(gated) == 0
    assert {r["condition"] for r in million.load_records(tmp_path / "gated.jsonl")} == {
        "text@bm25+subject", "passage_in_user_turn"}


@pytest.mark.filterwarnings("ignore")
def test_recall_of_a_saved_folder_equals_the_builds_checkpoint(data, built, tmp_path):
    """`recall` on the copy (built with the tiny stream's target) measures what the build measured when it made it."""
    output = tmp_path / "recall.jsonl"
    args = on_the_copy("recall", data, built, "--scorers", "bm25", "model", "--target-tokens", "700",
                       "--context-tokens", "48", "--output", str(output))
    assert million.main(args) == 0
    [record] = million.load_records(output)
    [at_copy] = [r for r in million.load_records(built / "records.jsonl") if r["labels"] == ["injections>=20"]]
    assert record["position"] == at_copy["position"] and record["stored_tokens"] == at_copy["stored_tokens"]
    assert record["questions_stored"] == at_copy["questions_stored"]
    assert comparable({**record, "run": "x-y"})["recall"] == comparable(at_copy)["recall"]
    # the rerank of the likelihood check at weight 0 keeps the scorer's order; at any weight it is recorded
    for weight in ("0", "0.05"):
        reranked = tmp_path / f"rerank-{weight}.jsonl"
        assert million.main([*args[:-1], str(reranked), "--scorers", "bm25", "--likelihood-weight", weight]) == 0
        [with_check] = million.load_records(reranked)
        assert with_check["likelihood_weight"] == float(weight)
        if weight == "0":
            same = [comparable({**r, "run": "x-y"})["recall"]["bm25"] for r in (with_check, record)]
            assert same[0] == same[1]
    # the whole store (past the dev data: the stream with filler) is found at the item the build reached
    whole = [*args[:-1], str(tmp_path / "whole.jsonl")]
    whole[whole.index("--folder") + 1] = str(built / "store" / million.STORE_DIR)
    assert million.main(whole) == 0
    progress = json.loads((built / "store" / million.PROGRESS_FILE).read_text())
    assert million.load_records(tmp_path / "whole.jsonl")[0]["position"] == progress["position"]


@pytest.mark.filterwarnings("ignore")
def test_text_only_recall_equals_the_recall_of_the_built_folder(data, built, tmp_path):
    """`recall --text-only 20` (no folder: the store's token ids rebuilt from the stream) measures the text scorers
    exactly as on the build's 20-injection copy; the "model" scorer, which reads slots, is refused."""
    common = ["--model", "tiny", "--style", "plain", "--data", str(data), "--target-tokens", "700",
              "--context-tokens", "48", "--scorers", "bm25"]
    on_copy, text_only = tmp_path / "copy.jsonl", tmp_path / "text-only.jsonl"
    assert million.main(["recall", *common, "--folder", str(built / "store" / million.COPY_DIR),
                         "--output", str(on_copy)]) == 0
    assert million.main(["recall", *common, "--text-only", "20", "--output", str(text_only)]) == 0
    [folder], [rebuilt] = million.load_records(on_copy), million.load_records(text_only)
    for key in ("position", "stored_tokens", "stored_injections", "questions_stored"):
        assert rebuilt[key] == folder[key]
    assert comparable({**rebuilt, "run": "x-y"})["recall"] == comparable({**folder, "run": "x-y"})["recall"]
    with pytest.raises(SystemExit, match="model"):
        million.main(["recall", *common[:-1], "model", "--text-only", "20", "--output", str(tmp_path / "m.jsonl")])
    # the text read reads token ids only: its answers on the rebuilt store equal those on the folder
    answers = ["answers", *common[:-2], "--read-modes", "text@bm25", "--questions", "2", "--max-new-tokens", "3"]
    on_copy, text_only = tmp_path / "answers-copy.jsonl", tmp_path / "answers-text-only.jsonl"
    assert million.main([*answers, "--folder", str(built / "store" / million.COPY_DIR), "--output", str(on_copy)]) == 0
    assert million.main([*answers, "--text-only", "20", "--output", str(text_only)]) == 0
    folder, rebuilt = ([r for r in million.load_records(path) if r["condition"] == "text@bm25"]
                           for path in (on_copy, text_only))
    assert len(folder) == 4 and folder == rebuilt
    with pytest.raises(SystemExit, match="text read"):
        million.main([*answers[:-6], "--read-modes", "retrieve", "--text-only", "20", "--output", str(text_only)])


def test_recall_refuses_a_folder_of_another_stream(data, built, tmp_path, monkeypatch):
    real = million.build_stream
    monkeypatch.setattr(million, "build_stream", lambda *a, **k: real(*a, **k)[:1])  # another, shorter stream
    with pytest.raises(SystemExit, match="not the end of any item"):
        million.main(on_the_copy("recall", data, built, "--scorers", "bm25", "--output", str(tmp_path / "r.jsonl")))
    assert not (tmp_path / "r.jsonl").exists()

"""Retention's stream protocol on the tiny model: distances since the passage, equality with the per-question
protocol for one question, resume and shards."""

import json

import pytest
import torch

from memoryllm_hf.evaluation.data import EvalData
from memoryllm_hf.evaluation.runner import example_seed
from memoryllm_hf.tiny import tiny_model
from memoryllm_hf.tiny import tiny_tokenizer as char_tokenizer


def _data(count: int, related: dict[int, str] | None = None) -> EvalData:
    """`count` questions (article R{i}); 40 unrelated paragraphs, paragraph j of article `related[j]` if given."""
    examples = [
        {
            "id": f"q{i}",
            "article": f"R{i}",
            "context": f"The page {i} says the key is k{i}.",
            "question": f"What is key {i}?",
            "answers": [f"k{i}"],
        }
        for i in range(count)
    ]
    related = related or {}
    unrelated = [
        {"id": f"p{j}", "article": related.get(j, f"A{j}"), "text": f"U{j:02d} paragraph on topic {j}."}
        for j in range(40)
    ]
    return EvalData("squad", examples, unrelated)


def _without_truncation(scores):
    return {k: v for k, v in scores.items() if k != "truncated_tokens"} if scores else scores


@torch.no_grad()
def test_one_question_in_one_stream_equals_the_per_question_protocol():
    """A checkpoint after every context, the question's own drop seed: every answer (memory, same text), the
    baselines and the updates since the passage equal the per-question protocol's with exact chaining."""
    from memoryllm_hf.evaluation.retention import run_retention
    from memoryllm_hf.evaluation.stream import run_retention_stream

    data, grid = _data(1), [0, 1, 2, 3]
    tokenizer = char_tokenizer()
    options = {"context_tokens": 24, "max_new_tokens": 3, "seed": 0}
    paper = run_retention(tiny_model(), tokenizer, data, ["plain", "chat"], grid=grid, shared_depth=None, **options)
    prefill = paper["protocol"]["prefill_contexts"]
    stream = run_retention_stream(
        tiny_model(),
        tokenizer,
        data,
        ["plain", "chat"],
        checkpoint_every=1,
        stream_contexts=prefill + grid[-1],
        drop_seed=example_seed(0, "q0"),
        **options,
    )
    once, *asks = stream["records"]
    expected = paper["records"][0]
    assert once["passage_position"] == prefill and once["passage_injections"] == expected["passage_injections"]
    assert once["no_memory"] == expected["no_memory"] and once["passage_only"] == expected["passage_only"]
    assert [a["contexts_since_passage"] for a in asks] == grid
    for ask in asks:
        k = str(ask["contexts_since_passage"])
        assert ask["updates_since_passage"] == expected["updates_after_related"][k]
        assert ask["memory"] == expected["memory"][k]
        for style in ("plain", "chat"):
            assert _without_truncation(ask["same_text"][style]) == _without_truncation(expected["same_text"][k][style])
    assert any(ask["memory"]["chat"]["generation"] for ask in asks)  # the answers compared are not all empty


def _updates(tokens: int, chunk: int = 16) -> int:
    return -(-tokens // chunk)  # the tiny model injects a text in ceil(n / inject_chunk_size) updates


def test_distance_since_the_passage_is_recorded_correctly(monkeypatch):
    """Five questions, one of whose article returns in the stream: every ask's distances equal those counted by
    hand from the stream's layout, questions are asked at every checkpoint from their passage on and never after a
    related context was stored after the passage."""
    from memoryllm_hf.evaluation import retention
    from memoryllm_hf.evaluation.retention import unrelated_contexts
    from memoryllm_hf.evaluation.stream import run_retention_stream

    monkeypatch.setattr(
        retention, "generate", lambda model, tokenizer, prompts, use_memory, config: ["x"] * len(prompts)
    )
    data = _data(5, related={20: "R1", 21: "R1"})
    tokenizer = char_tokenizer()
    result = run_retention_stream(
        tiny_model(),
        tokenizer,
        data,
        ["plain"],
        context_tokens=24,
        checkpoint_every=1,
        max_new_tokens=2,
        same_text_max_contexts=-1,
    )
    contexts = unrelated_contexts(data.unrelated, tokenizer, "article", 24)
    once = {r["id"]: r for r in result["records"] if r["kind"] == "once"}
    asks = [r for r in result["records"] if r["kind"] == "ask"]
    points = result["protocol"]["checkpoints"]
    # The stream as the protocol defines it: passages (question order) before the context at their position.
    stream = []  # (item, tokens)
    for k in range(len(contexts) + 1):
        stream += [
            (f"q{q}", len(data.examples[q]["context"])) for q in range(5) if once[f"q{q}"]["passage_position"] == k
        ]
        if k < len(contexts):
            stream.append((f"c{k}", len(contexts[k].ids)))
    related = [i for i, c in enumerate(contexts) if "R1" in c.sources]
    assert related and once["q1"]["passage_position"] <= related[0]
    positions = sorted(once[f"q{q}"]["passage_position"] for q in range(5))
    assert len(set(positions)) == 5 and positions[0] == result["protocol"]["prefill_contexts"]  # spread
    for q in range(5):
        mine = [a for a in asks if a["id"] == f"q{q}"]
        position = once[f"q{q}"]["passage_position"]
        stop = related[0] if q == 1 else len(contexts)
        assert [a["checkpoint"] for a in mine] == [k for k in points if position <= k <= stop]
        for ask in mine:
            start = stream.index((f"q{q}", len(data.examples[q]["context"])))
            end = stream.index((f"c{ask['checkpoint']}", 24)) if ask["checkpoint"] < len(contexts) else len(stream)
            after = stream[start + 1 : end]
            assert ask["contexts_since_passage"] == ask["checkpoint"] - position
            assert ask["updates_since_passage"] == sum(_updates(n) for _, n in after)
            assert ask["tokens_since_passage"] == sum(n for _, n in after)
            assert ask["stored_tokens"] == sum(n for _, n in stream[:end])
            assert ask["stored_updates"] == sum(_updates(n) for _, n in stream[:end])
    metrics = result["metrics"]["plain"]
    assert sum(cell["n"] for cell in metrics["memory_by_updates"].values()) == len(asks)
    assert metrics["no_memory"]["n"] == 5 and metrics["no_memory"]["exact_hit_ci"] == [0.0, 0.4345]


def _main(*argv):
    from memoryllm_hf.evaluation.cli import main

    assert main(["eval", *argv]) == 0


def _drop_times(value):
    if isinstance(value, dict):
        return {
            k: _drop_times(v)
            for k, v in value.items()
            if k not in ("created", "output", "batch_rows") and not k.endswith(("wall_time_s", "cpu_time_s", "_seconds"))
        }
    if isinstance(value, list):
        return [_drop_times(v) for v in value]
    return value


@pytest.fixture
def stream_data(tmp_path):
    data = _data(4, related={30: "R2"})
    folder = tmp_path / "data"
    folder.mkdir()
    for name, rows in (("squad_qa.jsonl", data.examples), ("squad_paragraphs.jsonl", data.unrelated)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


STREAM_ARGS = ["retention", "--model", "tiny", "--context-tokens", "24", "--checkpoint-every", "5"]
STREAM_ARGS += ["--max-new-tokens", "2", "--prompt-style", "chat", "--stream-contexts", "16", "--batch-size", "3"]


def test_stream_runs_resume_and_shard_to_the_same_records(stream_data, tmp_path, monkeypatch):
    from memoryllm_hf.evaluation import records as records_module
    from memoryllm_hf.evaluation.report import main as report_main

    argv = [*STREAM_ARGS, "--data", str(stream_data)]
    _main(*argv, "--output", str(tmp_path / "whole.json"))
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert whole["protocol"]["name"] == "stream" and whole["metrics"]["asks"] == whole["protocol"]["asks"] > 4
    assert (tmp_path / "whole.png").exists()

    add, calls = records_module.RecordLog.add, []

    def interrupted(log, key, index, record):
        calls.append(key)
        if len(calls) == 6:
            raise KeyboardInterrupt
        add(log, key, index, record)

    monkeypatch.setattr(records_module.RecordLog, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _main(*argv, "--output", str(tmp_path / "cut.json"))
    monkeypatch.setattr(records_module.RecordLog, "add", add)
    _main(*argv, "--output", str(tmp_path / "cut.json"), "--resume")
    resumed = json.loads((tmp_path / "cut.json").read_text())
    assert _drop_times(resumed["records"]) == _drop_times(whole["records"])
    assert _drop_times(resumed["metrics"]) == _drop_times(whole["metrics"])

    for shard in range(2):
        _main(*argv, "--shard", f"{shard}/2", "--output", str(tmp_path / f"s{shard}.json"))
    shards = [str(tmp_path / f"s{shard}.json") for shard in range(2)]
    assert report_main(["--merge", str(tmp_path / "merged.json"), *shards]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert _drop_times(merged["records"]) == _drop_times(whole["records"])
    assert _drop_times(merged["metrics"]) == _drop_times(whole["metrics"])


def test_stream_options_are_checked(stream_data, tmp_path):
    with pytest.raises(ValueError, match="per-question"):
        _main(*STREAM_ARGS, "--data", str(stream_data), "--grid", "0,1", "--output", str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="checkpoint-every"):
        _main(
            *STREAM_ARGS[:-2],
            "--checkpoint-every",
            "0",
            "--data",
            str(stream_data),
            "--output",
            str(tmp_path / "y.json"),
        )


def test_agreement_of_the_protocols_for_one_question():
    """The report's side-by-side of the two protocols: one question, exact chaining, same drop seed: at every k the
    same exact hit and the same answer."""
    from memoryllm_hf.evaluation.report import agreement, agreement_table
    from memoryllm_hf.evaluation.retention import run_retention
    from memoryllm_hf.evaluation.stream import run_retention_stream

    data, tokenizer = _data(1), char_tokenizer()
    options = {"context_tokens": 24, "max_new_tokens": 3, "seed": 0}
    paper = run_retention(tiny_model(), tokenizer, data, ["chat"], grid=[0, 1], shared_depth=None, **options)
    prefill = paper["protocol"]["prefill_contexts"]
    stream = run_retention_stream(
        tiny_model(),
        tokenizer,
        data,
        ["chat"],
        checkpoint_every=1,
        stream_contexts=prefill + 1,
        drop_seed=example_seed(0, "q0"),
        **options,
    )
    table = agreement(stream, paper)
    assert list(table) == ["0", "1"]
    assert all(cells["n"] == 1 and cells["same_answer"] == 1.0 for cells in table.values())
    assert all(cells["stream"] == cells["per_question"] for cells in table.values())
    assert "per-question exact hit" in agreement_table(table)


def test_doubling_asks_at_the_first_checkpoint_past_each_power_of_two():
    """Counted by hand: checkpoints every 3 contexts from 2 (and the end, 40); a question is asked at the first
    checkpoint at or past 0, 1, 2, 4, 8, ... contexts since its passage, within its clean window."""
    from memoryllm_hf.evaluation.stream import ask_schedule, checkpoints

    points = checkpoints(2, 40, 3)
    places = [
        {"position": 2, "clean_until": 41},
        {"position": 6, "clean_until": 20},
        {"position": 39, "clean_until": 41},
    ]
    every = ask_schedule(places, points, None)
    doubling = ask_schedule(places, points, None, "doubling")
    assert doubling == [[2, 5, 8, 11, 20, 35], [8, 11, 14], [40]]
    assert every[1] == [8, 11, 14, 17, 20] and all(set(d) <= set(e) for d, e in zip(doubling, every, strict=True))
    assert ask_schedule(places, points, 10, "doubling")[0] == [2, 5, 8, 11]
    with pytest.raises(ValueError, match="ask-spacing"):
        ask_schedule(places, points, None, "often")


@torch.no_grad()
def test_same_text_asks_of_one_checkpoint_share_the_cut_stream(monkeypatch):
    """Questions of different lengths, a stream longer than the window: the same-text prompts of one checkpoint keep
    the same stream text (cut as for the longest question), so each runs only its question on the kept cache."""
    from memoryllm_hf.evaluation import stream as stream_module
    from memoryllm_hf.evaluation.runner import ExtendingPrompts

    data = _data(10)
    for i, example in enumerate(data.examples):
        example["question"] = f"What is key {i}?" + " Say it" * (2 * i)
    calls, answer = [], ExtendingPrompts.answer

    def spied(chain, ids):
        before = chain.reused
        found = answer(chain, ids)
        calls.append((list(ids), chain.reused - before))
        return found

    monkeypatch.setattr(ExtendingPrompts, "answer", spied)
    result = stream_module.run_retention_stream(
        tiny_model(max_position_embeddings=1024), char_tokenizer(), data, ["chat"], context_tokens=24,
        checkpoint_every=3, stream_contexts=14, max_new_tokens=2, window=400,
    )  # fmt: skip
    asks = [r for r in result["records"] if r["kind"] == "ask" and r["same_text"]["chat"] is not None]
    questions = {example["id"]: example["question"] for example in data.examples}
    assert len(calls) == len(asks) > 6
    shared = 0
    for (before, _), (ids, reused), ask, previous in zip(calls, calls[1:], asks[1:], asks, strict=False):
        if ask["checkpoint"] != previous["checkpoint"]:
            continue
        question = len(f"\n\nAnswer the question with a short phrase, no full sentence.\nQuestion: {questions[ask['id']]}")
        assert reused >= len(ids) - question - 40  # all but the question (and the template's end) came from the cache
        shared += ask["same_text"]["chat"]["truncated_tokens"] > 0
    assert shared > 0  # ... also where the stream was cut to the window

"""Evaluation harness end to end on 3 hand-made examples per task with a tiny random model (schema, determinism),
plus the prompt builder and the teacher-forced scorer."""

import json
import shlex

import pytest
import torch

from memoryllm_hf.evaluation.cli import main
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.evaluation.report import report
from memoryllm_hf.evaluation.runner import continuation_scores
from memoryllm_hf.tiny import tiny_model
from memoryllm_hf.tiny import tiny_tokenizer as char_tokenizer

ARTICLES = ["Rivers", "Birds", "Stars", "Bread", "Ships", "Clocks"]


def _write(folder, name, rows):
    (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    _write(
        folder,
        "squad_qa.jsonl",
        [
            {
                "id": f"s{i}",
                "article": ARTICLES[i],
                "context": f"The {ARTICLES[i].lower()} page says the key is k{i}.",
                "question": f"What is the key of {ARTICLES[i]}?",
                "answers": [f"k{i}"],
            }
            for i in range(3)
        ],
    )
    _write(
        folder,
        "squad_paragraphs.jsonl",
        [
            {"id": f"p{i}", "article": ARTICLES[i % 6], "text": f"Paragraph {i} about {ARTICLES[i % 6]} and more."}
            for i in range(30)
        ],
    )
    _write(
        folder,
        "nq_qa.jsonl",
        [
            {
                "id": f"n{i}",
                "title": ARTICLES[i],
                "context": f"{ARTICLES[i]} were counted: {i + 3} of them.",
                "question": f"how many {ARTICLES[i].lower()}",
                "answers": [str(i + 3)],
            }
            for i in range(3)
        ],
    )
    _write(
        folder,
        "nq_passages.jsonl",
        [
            {"id": f"np{i}", "title": ARTICLES[3 + i % 3], "text": f"Passage {i} on {ARTICLES[3 + i % 3]}."}
            for i in range(30)
        ],
    )
    edits = [
        {
            "case_id": i,
            "subject": f"Sub{i}",
            "prompt": f"Sub{i} speaks",
            "target_new": "Lang A",
            "target_true": "Lang B",
            "paraphrase_prompts": [f"People say Sub{i} speaks", f"Sub{i}'s language is"],
            "neighborhood_prompts": [{"prompt": f"Other{i} speaks", "target": "Lang B"}],
            "edit_text": f"Sub{i} speaks Lang A.",
        }
        for i in range(3)
    ]
    _write(folder, "counterfact.jsonl", edits)
    _write(folder, "zsre.jsonl", [{**e, "prompt": f"What does Sub{e['case_id']} speak?"} for e in edits])
    _write(
        folder,
        "hotpotqa.jsonl",
        [
            {
                "id": f"h{i}",
                "question": f"Where is thing {i}?",
                "answer": f"place {i}",
                "type": "bridge",
                "paragraphs": [{"title": f"T{j}", "text": f"Thing {j} is in place {j}."} for j in range(4)],
                "supporting_titles": [f"T{i}"],
            }
            for i in range(3)
        ],
    )
    return folder


def _run(task, data_dir, out, *extra):
    argv = ["eval", task, "--model", "tiny", "--data", str(data_dir), "--limit", "3", "--output", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def _drop_times(value):
    """The document without wall times, timestamps and the output path (which differ between identical runs)."""
    if isinstance(value, dict):
        return {
            k: _drop_times(v)
            for k, v in value.items()
            if k not in ("created", "output", "seconds_per_update") and not k.endswith(("wall_time_s", "cpu_time_s", "_seconds"))
        }
    if isinstance(value, list):
        return [_drop_times(v) for v in value]
    return value


HEAD = {
    "task",
    "created",
    "config",
    "model",
    "data",
    "seed",
    "environment",
    "prompt_styles",
    "metrics",
    "records",
    "wall_time_s",
}


def test_retention_end_to_end(data_dir, tmp_path):
    extra = ["--protocol", "per-question", "--grid", "0,1,2", "--context-tokens", "24", "--max-new-tokens", "4"]
    first = _run("retention", data_dir, tmp_path / "a.json", *extra)
    second = _run("retention", data_dir, tmp_path / "b.json", *extra)
    assert HEAD | {"protocol", "decoding"} <= set(first)
    assert _drop_times(first) == _drop_times(second)
    assert (tmp_path / "a.png").stat().st_size > 0
    assert first["decoding"]["do_sample"] is False and first["prompt_styles"] == ["plain", "chat"]
    assert first["data"]["num_examples"] == 3 and len(first["data"]["file_sha256"]) == 2
    record = first["records"][0]
    assert set(record["memory"]) == set(record["same_text"]) == {"0", "1", "2"}
    assert set(record["passage_only"]) == set(record["no_memory"]) == {"plain", "chat"}
    assert set(record["memory"]["2"]["chat"]) >= {"generation", "answer", "exact_hit", "f1", "exact_match"}
    assert record["updates_after_related"]["0"] == 0 < record["updates_after_related"]["1"]
    metrics = first["metrics"]
    assert metrics["retention_bound"]["0"] == 1.0 > metrics["retention_bound"]["2"]
    assert metrics["chat"]["memory"]["1"]["n"] == 3


def test_retention_nq_skips_contexts_of_the_question_title(data_dir, tmp_path):
    extra = [
        "--dataset",
        "nq",
        "--protocol",
        "per-question",
        "--grid",
        "0,2",
        "--context-tokens",
        "24",
        "--max-new-tokens",
        "2",
        "--prompt-style",
        "chat",
    ]
    result = _run("retention", data_dir, tmp_path / "nq.json", *extra)
    assert result["data"]["dataset"] == "nq" and result["prompt_styles"] == ["chat"]
    passages = [json.loads(line) for line in (data_dir / "nq_passages.jsonl").read_text().splitlines()]
    # Contexts are built from consecutive passages; NQ passages here alternate Bread/Ships/Clocks titles, none of
    # which is a question title, so every question may use the same contexts.
    assert {p["title"] for p in passages}.isdisjoint(ARTICLES[:3])
    assert len({tuple(r["unrelated_contexts"]) for r in result["records"]}) == 1


def test_retention_squad_skips_contexts_of_the_question_article(data_dir, tmp_path):
    from memoryllm_hf.evaluation.data import load_data
    from memoryllm_hf.evaluation.retention import unrelated_contexts

    data = load_data(data_dir, "squad")
    contexts = unrelated_contexts(data.unrelated, char_tokenizer(), "article", 24)
    result = _run(
        "retention",
        data_dir,
        tmp_path / "s.json",
        "--protocol",
        "per-question",
        "--grid",
        "0,4",
        "--context-tokens",
        "24",
        "--max-new-tokens",
        "1",
        "--prompt-style",
        "plain",
    )
    for record, example in zip(result["records"], data.examples, strict=True):
        used = record["unrelated_contexts"]
        assert all(example["article"] not in contexts[i].sources for i in used)


def test_retention_sharing_is_recorded_and_optional(data_dir, tmp_path):
    extra = ["--protocol", "per-question", "--grid", "0,2", "--context-tokens", "24", "--max-new-tokens", "2"]
    extra += ["--prompt-style", "plain"]
    extra += ["--in-context-max-k", "0"]
    shared = _run("retention", data_dir, tmp_path / "shared.json", *extra, "--shared-depth", "1")
    exact = _run("retention", data_dir, tmp_path / "exact.json", *extra, "--shared-depth", "-1")
    assert sum(r["chunks"]["shared"] for r in shared["records"]) > 0
    assert sum(r["chunks"]["shared"] for r in exact["records"]) == 0
    assert exact["protocol"]["shared_depth"] is None
    same_text = exact["metrics"]["plain"]["same_text"]
    assert same_text["0"]["n"] == 3 and same_text["2"]["n"] == 0


def test_editing_end_to_end(data_dir, tmp_path):
    extra = ["--sequential"]
    first = _run("editing", data_dir, tmp_path / "a.json", *extra)
    second = _run("editing", data_dir, tmp_path / "b.json", *extra)
    assert _drop_times(first) == _drop_times(second)
    assert (tmp_path / "a.png").stat().st_size > 0
    for style in ("plain", "chat"):
        for condition in ("no_edit", "memory", "in_context"):
            summary = first["metrics"][style][condition]
            assert summary["n"] == 3
            assert {"efficacy", "generalization", "specificity", "score", "efficacy_exact"} <= set(summary)
    record = first["records"][0]
    assert len(record["memory"]["chat"]["generalization"]) == 2
    assert {"wanted", "rival", "success", "exact"} == set(record["memory"]["chat"]["efficacy"][0])
    sequential = first["sequential"]
    assert [r["age"] for r in sequential["records"]] == [2, 1, 0]
    assert sequential["metrics"]["chat"]["n"] == 3


def test_editing_zsre_questions(data_dir, tmp_path):
    result = _run(
        "editing",
        data_dir,
        tmp_path / "z.json",
        "--dataset",
        "zsre",
        "--prompt-style",
        "plain",
        "--sequential",
        "--sequential-probe-every",
        "2",
    )
    assert result["data"]["dataset"] == "zsre"
    assert [r["age"] for r in result["sequential"]["records"]] == [2, 0]
    assert result["metrics"]["plain"]["memory"]["n"] == 3


@pytest.mark.parametrize("task", ["retention", "editing"])
def test_report_command_reproduces_the_results(data_dir, tmp_path, task):
    extra = ["--protocol", "per-question", "--grid", "0,2", "--context-tokens", "24", "--max-new-tokens", "3"]
    extra = extra if task == "retention" else []
    extra += ["--sequential", "--dataset", "zsre"] if task == "editing" else []
    first = _run(task, data_dir, tmp_path / "a.json", *extra)
    text = report(tmp_path / "a.json")
    line = text.split("```")[1].strip()
    assert line.startswith(f"memoryllm-hf eval {task} ") and line.endswith(f"--output {tmp_path / 'a.json'}")
    argv = shlex.split(line)[1:-2] + ["--output", str(tmp_path / "b.json")]
    assert main(argv) == 0
    assert _drop_times(json.loads((tmp_path / "b.json").read_text())) == _drop_times(first)
    if task == "retention":
        assert "| k=0 | k=2 |" in text and "| chat | memory | " in text
    else:
        assert "| chat | memory, sequential | 3 |" in text


def test_longcontext_end_to_end(data_dir, tmp_path):
    extra = ["--window", "200", "--max-new-tokens", "6"]
    first = _run("longcontext", data_dir, tmp_path / "a.json", *extra)
    second = _run("longcontext", data_dir, tmp_path / "b.json", *extra)
    assert _drop_times(first) == _drop_times(second)
    metrics = first["metrics"]["chat"]
    assert {"no_memory", "memory", "in_context"} == set(metrics)
    assert metrics["in_context"]["truncated_examples"] == 3  # instruction + 4 passages do not fit 200 characters
    record = first["records"][0]
    assert record["updates"] >= 2 and record["in_context"]["chat"]["truncated_tokens"] > 0


def test_integrity_end_to_end(data_dir, tmp_path):
    extra = ["--updates", "7", "--record-every", "3", "--prompt-style", "chat", "--probe", "teacher-forced"]
    first = _run("integrity", data_dir, tmp_path / "a.json", *extra)
    second = _run("integrity", data_dir, tmp_path / "b.json", *extra)
    assert _drop_times(first) == _drop_times(second)
    assert [row["injections"] for row in first["rows"]] == [3, 6, 7]
    row = first["rows"][-1]
    assert {"running_accuracy", "window_accuracy", "norm_mean", "norm_max", "nonfinite", "filled_slots"} <= set(row)
    assert first["metrics"]["max_nonfinite"] == 0 and first["probe"]["mode"] == "teacher-forced"
    assert first["metrics"]["probes"] == 7
    assert (tmp_path / "a.png").stat().st_size > 0
    generated = _run(
        "integrity",
        data_dir,
        tmp_path / "g.json",
        "--updates",
        "4",
        "--record-every",
        "2",
        "--probe-every",
        "2",
        "--max-new-tokens",
        "3",
    )
    assert generated["metrics"]["probes"] == 2
    assert generated["probe"] == {"mode": "generate", "every": 2, "style": "chat", "max_new_tokens": 3}


def test_integrity_tiny_soak(tmp_path):
    out = tmp_path / "tiny.json"
    assert main(["eval", "integrity", "--tiny", "--updates", "300", "--record-every", "100", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["updates"] == 300 and result["metrics"]["max_nonfinite"] == 0
    assert "running_accuracy" not in result["rows"][0] and result["model"]["spec"] == "tiny"


def test_prompts_plain_chat_and_truncation():
    tokenizer = char_tokenizer()
    plain = Prompter(tokenizer, "plain", window=64)
    assert tokenizer.decode(plain.question("Why?").ids) == "Question: Why? Answer:"
    chat = Prompter(tokenizer, "chat", window=64)
    assert tokenizer.decode(chat.question("Why?").ids).startswith("<s>user: ")
    cut = plain.question("Why?", context="x" * 100, reserve=8)
    assert len(cut.ids) + 8 <= 64 and cut.truncated_tokens == 100 - (64 - 8 - len("\n\nQuestion: Why? Answer:"))
    assert tokenizer.decode(cut.ids).startswith("xxx")
    with pytest.raises(ValueError, match="question alone"):
        plain.question("W" * 80, context="x", reserve=0)
    prefix, target = plain.completion("Sub speaks", "Lang A", "sentence")
    assert tokenizer.decode(prefix + target) == "Sub speaks Lang A"


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_prompts_cut_as_the_longest_question_keep_one_context(style):
    """Questions of different lengths after one long context: cut as for the longest, every prompt keeps the same
    context tokens (their fronts are equal up to the question), fits the window and says how much was cut."""
    tokenizer = char_tokenizer()
    prompter = Prompter(tokenizer, style, window=200)
    context, questions = "".join(f"w{i} " for i in range(60)), ["Why?", "And what then, in the end?", "Who is it?"]
    longest = max(questions, key=len)
    own = [prompter.question(q, context, reserve=4) for q in questions]
    assert len({p.truncated_tokens for p in own}) == 3  # cut for itself, each keeps a different context
    cut = [prompter.question(q, context, reserve=4, cut_as=longest) for q in questions]
    assert len({p.truncated_tokens for p in cut}) == 1 and cut[1] == own[1]
    for prompt, question in zip(cut, questions, strict=True):
        assert len(prompt.ids) + 4 <= 200
        text = tokenizer.decode(prompt.ids)
        assert context[prompt.truncated_tokens :] + "\n\n" in text and f"Question: {question}" in text
    kept = len(context) - cut[0].truncated_tokens
    for a, b in ((cut[0], cut[1]), (cut[1], cut[2])):
        common = next(i for i, (x, y) in enumerate(zip(a.ids, b.ids, strict=False)) if x != y)
        assert common >= kept
    # a question longer than `cut_as` does not fit that cut: it is cut for itself
    assert prompter.question(longest, context, reserve=4, cut_as="Why?") == own[1]


@torch.no_grad()
@pytest.mark.parametrize("use_memory", [False, True])
def test_continuation_scores_match_full_forward_passes(use_memory):
    """Shared prefixes, different lengths, padding: each score equals the one read off a plain forward pass."""
    model = tiny_model(memory_update="input", fresh_pool="grow")
    model.inject(list(range(10, 40)))
    header = [20, 21, 22, 23, 24, 25]  # a shared start (chat header) is run once
    pairs = [([5, 6, 7, 8], [9, 10]), ([5, 6, 7, 8], [11]), ([5, 6], [12, 13, 14, 15, 16])]
    one_token = [(header + [7], [9]), (header + [8, 9], [10]), (header, [11]), (header + [7], [12])]
    shared = [(header + [7, 8], [9, 10, 11]), (header + [9], [12, 13]), ([30, 31], [32, 33]), ([40], [41, 42])]
    scores = continuation_scores(model, pairs, use_memory)
    for (prefix, target), score in [
        *zip(pairs, scores, strict=True),
        *zip(one_token, continuation_scores(model, one_token, use_memory), strict=True),
        *zip(shared, continuation_scores(model, shared, use_memory), strict=True),
    ]:
        log_probs = model(torch.tensor([prefix + target]), use_memory=use_memory).logits.log_softmax(-1)[0]
        steps = log_probs[len(prefix) - 1 : len(prefix) + len(target) - 1]
        expected = steps[torch.arange(len(target)), torch.tensor(target)].sum()
        assert score["logprob"] == pytest.approx(float(expected), abs=1e-5)
        assert score["greedy"] is bool((steps.argmax(-1) == torch.tensor(target)).all())
    assert scores[0]["logprob"] != scores[1]["logprob"]


@torch.no_grad()
def test_extending_prompts_reuse_the_cache_and_answer_like_plain_generation():
    from memoryllm_hf.evaluation.runner import ExtendingPrompts, generate, greedy_config

    model, tokenizer = tiny_model(), char_tokenizer()
    config = greedy_config(tokenizer, 6)
    texts = ["The first passage.", "The first passage. And a second one.", "Cut: a second one.", "Cut: a second"]
    prompts = [tokenizer(f"{text}\nQuestion: where? Answer:")["input_ids"] for text in texts]
    chain = ExtendingPrompts(model, tokenizer, config)
    for ids in prompts:
        assert chain.answer(ids) == generate(model, tokenizer, [ids], False, config)[0]
        # the kept cache starts with exactly this prompt's keys/values
        fresh = model(torch.tensor([ids]), use_memory=False, use_cache=True).cache
        for kept, plain in zip(chain.cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(kept.keys[:, :, : len(ids)], plain.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(kept.values[:, :, : len(ids)], plain.values, rtol=1e-5, atol=1e-5)
    # reused: "The first passage." (18), then "Cut: a second" (13)
    assert chain.reused == len(tokenizer("The first passage.")["input_ids"]) + len("Cut: a second")


@torch.no_grad()
def test_batched_generation_matches_single_prompts():
    from memoryllm_hf.evaluation.runner import generate, greedy_config

    model, tokenizer = tiny_model(memory_update="input", fresh_pool="grow"), char_tokenizer()
    model.inject(list(range(10, 60)))
    prompts = [tokenizer("a longer prompt")["input_ids"], tokenizer("short")["input_ids"]]
    config = greedy_config(tokenizer, 5)
    for use_memory in (False, True):
        alone = [generate(model, tokenizer, [prompt], use_memory, config)[0] for prompt in prompts]
        assert generate(model, tokenizer, prompts, use_memory, config) == alone


# ---------------------------------------------------------------- independent drops, baselines, overrides


def _retention_data(count: int, same_text: bool = False):
    """EvalData with `count` questions (identical texts with `same_text`) and enough unrelated paragraphs."""
    from memoryllm_hf.evaluation.data import EvalData

    examples = [
        {
            "id": f"q{i}",
            "article": "Rivers",
            "context": "The rivers page says the key is k0." if same_text else f"The page {i} says the key is k{i}.",
            "question": "What is the key?",
            "answers": ["k0"],
        }
        for i in range(count)
    ]
    unrelated = [{"id": f"p{i}", "article": f"A{i}", "text": f"U{i:02d} paragraph on topic {i}."} for i in range(40)]
    return EvalData("squad", examples, unrelated)


def test_example_seed_is_a_stable_hash_of_seed_and_id():
    from memoryllm_hf.evaluation.runner import example_seed

    assert example_seed(0, "q1") == example_seed(0, "q1")
    assert len({example_seed(0, "q1"), example_seed(0, "q2"), example_seed(1, "q1")}) == 3
    assert example_seed(0, "q1") == 7670228066775147330  # the same in every process (no salted hash())


@torch.no_grad()
def test_retention_draws_drops_per_question_reproducibly(monkeypatch):
    """Two questions with the same texts: their pools differ once drops happen (independent drop realisations), and
    a second run gives the same pools (reproducible from the seed)."""
    from memoryllm_hf.evaluation import replay, retention

    pools = []
    load = replay.QuestionChain.load

    def spy(chain):
        pools.append(chain.pool.materialize().memory.clone())
        load(chain)

    monkeypatch.setattr(replay.QuestionChain, "load", spy)
    runs = []
    for _ in range(2):
        pools.clear()
        model, tokenizer = tiny_model(), char_tokenizer()
        retention.run_retention(
            model,
            tokenizer,
            _retention_data(2, same_text=True),
            ["plain"],
            grid=[0, 3],
            context_tokens=24,
            max_new_tokens=1,
            in_context_max_k=0,
            shared_depth=None,
        )
        runs.append(list(pools))
    (first_k0, first_k3, second_k0, second_k3) = runs[0]
    assert not torch.equal(first_k3, second_k3)  # same texts, other drops
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))


def test_retention_baselines_are_the_passage_and_the_same_text(monkeypatch):
    """passage only = the passage + question; same text = prefill + passage + k unrelated contexts + question, cut
    from the left to the window (the question kept); memory prompts hold only the question."""
    from memoryllm_hf.evaluation import retention

    calls = []

    def spy(model, tokenizer, prompts, use_memory, config):
        calls.extend((tokenizer.decode(ids), use_memory) for ids in prompts)
        return ["x"] * len(prompts)

    def answer(prompts, ids):
        calls.append((prompts.tokenizer.decode(ids), False))
        return "x"

    monkeypatch.setattr(retention, "generate", spy)
    monkeypatch.setattr(retention.ExtendingPrompts, "answer", answer)
    model, tokenizer = tiny_model(), char_tokenizer()
    data = _retention_data(1)
    tail = "\n\nQuestion: What is the key? Answer:"
    for window in (1000, 110):
        calls.clear()
        result = retention.run_retention(
            model, tokenizer, data, ["plain"], grid=[0, 2], context_tokens=24, max_new_tokens=2, window=window
        )
        record = result["records"][0]
        contexts = retention.unrelated_contexts(data.unrelated, tokenizer, "article", 24)
        prefill = [contexts[i].text for i in range(result["protocol"]["prefill_contexts"])]
        unrelated = [contexts[i].text for i in record["unrelated_contexts"]]
        passage = data.examples[0]["context"]
        asked = [text for text, use_memory in calls if not use_memory]
        assert [text for text, use_memory in calls if use_memory] == ["Question: What is the key? Answer:"] * 2
        assert asked[0] == "Question: What is the key? Answer:" and asked[1] == passage + tail
        for k, text in zip((0, 2), asked[2:], strict=True):
            full = "\n\n".join([*prefill, passage, *unrelated[:k]]) + tail
            assert text.endswith(tail) and len(text) + 2 <= window
            if window == 1000:
                assert text == full and "truncated_tokens" not in record["same_text"][str(k)]["plain"]
            else:  # cut from the left: a suffix of the same text
                assert (
                    full.endswith(text[-len(tail) - 40 :]) and record["same_text"][str(k)]["plain"]["truncated_tokens"]
                )
        assert set(record) >= {"no_memory", "passage_only", "memory", "same_text", "passage_injections"}


def test_retention_records_what_a_retrieving_model_retrieved(monkeypatch):
    from memoryllm_hf.evaluation import retention

    monkeypatch.setattr(
        retention, "generate", lambda model, tokenizer, prompts, use_memory, config: ["x"] * len(prompts)
    )
    model, tokenizer = tiny_model(), char_tokenizer()
    model.last_retrieval = [torch.tensor([3, 1]), [2]]  # what a model with retrieval reports per batch row
    result = retention.run_retention(
        model, tokenizer, _retention_data(1), ["plain", "chat"], grid=[0], context_tokens=24, max_new_tokens=2
    )
    record = result["records"][0]
    assert record["memory"]["0"]["plain"]["retrieved"] == [3, 1] and record["memory"]["0"]["chat"]["retrieved"] == [2]
    assert "retrieved" not in record["no_memory"]["plain"] and "retrieved" not in record["same_text"]["0"]["plain"]
    assert record["passage_injections"] == [5, 6]  # after two prefill contexts of two chunks each


def test_config_overrides_reach_the_model_and_unknown_fields_fail(data_dir, tmp_path):
    from transformers import LlamaConfig

    from memoryllm_hf.evaluation.models import check_overrides, parse_overrides

    assert parse_overrides(["memory_seed=5", "read_mode=retrieve", "x=0.5"]) == {
        "memory_seed": 5,
        "read_mode": "retrieve",
        "x": 0.5,
    }
    result = _run("integrity", data_dir, tmp_path / "o.json", "--updates", "1", "--set", "memory_seed=5")
    assert result["model"]["memory"]["memory_seed"] == 5 and result["config"]["set"] == ["memory_seed=5"]
    assert "--set memory_seed=5" in report(tmp_path / "o.json")
    with pytest.raises(ValueError, match="has no field 'read_mode'.*drop --read-mode"):
        check_overrides(LlamaConfig, {"read_mode": "retrieve"})
    with pytest.raises(ValueError, match="has no field 'no_such_field'"):
        _run("integrity", data_dir, tmp_path / "p.json", "--updates", "1", "--set", "no_such_field=1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["read_mode"])


def test_read_mode_passes_through_to_the_config(data_dir, tmp_path):
    from memoryllm_hf.evaluation.models import config_fields
    from memoryllm_hf.modeling import MemoryLlamaConfig

    if "read_mode" not in config_fields(MemoryLlamaConfig):
        with pytest.raises(ValueError, match="no field 'read_mode'"):
            _run("integrity", data_dir, tmp_path / "r.json", "--updates", "1", "--read-mode", "retrieve")
        return
    with pytest.raises(ValueError, match="long_term_memory_tokens > 0"):  # the tiny model has no store by default
        _run("integrity", data_dir, tmp_path / "r.json", "--updates", "1", "--read-mode", "retrieve")
    args = ("--updates", "1", "--read-mode", "retrieve", "--set", "long_term_memory_tokens=64")
    result = _run("integrity", data_dir, tmp_path / "r.json", *args)
    assert result["model"]["read"]["read_mode"] == "retrieve"
    assert result["model"]["read"]["long_term_memory_tokens"] == 64


# ---------------------------------------------------------------- resumable, splittable runs

SHARD_ARGS = {
    "retention": ["--protocol", "per-question", "--grid", "0,2", "--context-tokens", "24", "--max-new-tokens", "2"],
    "editing": ["--sequential", "--prompt-style", "plain"],
    "longcontext": ["--max-new-tokens", "2", "--prompt-style", "chat"],
}


@pytest.mark.parametrize("task", sorted(SHARD_ARGS))
def test_shards_merged_equal_one_run(data_dir, tmp_path, task):
    from memoryllm_hf.evaluation.report import main as report_main

    whole = _run(task, data_dir, tmp_path / "whole.json", *SHARD_ARGS[task])
    for shard in range(2):
        _run(task, data_dir, tmp_path / f"s{shard}.json", *SHARD_ARGS[task], "--shard", f"{shard}/2")
    shards = [str(tmp_path / f"s{shard}.json") for shard in (1, 0)]
    second = json.loads((tmp_path / "s1.json").read_text())["records"]
    assert _drop_times(second) == _drop_times(whole["records"][1::2])
    assert report_main(["--merge", str(tmp_path / "merged.json"), *shards]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [s["shard"] for s in merged.pop("shards")] == [[0, 2], [1, 2]]
    assert _drop_times(merged) == _drop_times(whole)
    with pytest.raises(ValueError, match="every shard"):
        report_main(["--merge", str(tmp_path / "bad.json"), shards[0]])


def _log_lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_killed_run_resumes_to_the_same_records(tmp_path):
    """A real process killed mid-run, resumed: the records equal those of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "data"
    folder.mkdir()
    data = _retention_data(8)
    _write(folder, "squad_qa.jsonl", data.examples)
    _write(folder, "squad_paragraphs.jsonl", data.unrelated)
    argv = ["retention", "--model", "tiny", "--data", str(folder), "--protocol", "per-question", "--grid", "0,1"]
    argv += ["--context-tokens", "24"]
    argv += ["--prompt-style", "plain", "--max-new-tokens", "4", "--threads", "1"]
    killed = tmp_path / "killed.json"
    log = tmp_path / "killed.records.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "memoryllm_hf.evaluation", *argv, "--output", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if log.exists() and len(_log_lines(log)) >= 3:  # header + 2 records
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    done = len(_log_lines(log)) - 1
    assert process.returncode == -signal.SIGKILL and 2 <= done < 8 and not killed.exists()
    with open(log, "a") as handle:  # as if the kill had come in the middle of writing a record
        handle.write('{"key": "q7", "index": 7, "rec')
    with pytest.raises(FileExistsError, match="--resume"):
        main(["eval", *argv, "--output", str(killed)])
    with pytest.raises(ValueError, match="max_new_tokens: 4 in the log, 3 now"):
        main(["eval", *argv[:-3], "3", "--threads", "1", "--output", str(killed), "--resume"])
    assert main(["eval", *argv, "--threads", "2", "--output", str(killed), "--resume"]) == 0
    assert len(_log_lines(log)) == 1 + 8  # each record once, the cut line gone
    whole = _run_argv(argv, tmp_path / "whole.json")
    resumed = json.loads(killed.read_text())
    # timed over both sittings (the killed one's records carry what it had spent), the unbroken run in one
    assert resumed["sittings"] == 2 and whole["sittings"] == 1
    assert resumed["wall_time_s"] > resumed["sitting_wall_time_s"] > 0 and resumed["cpu_time_s"] > 0
    assert _drop_times(resumed["records"]) == _drop_times(whole["records"])
    assert _drop_times(resumed["metrics"]) == _drop_times(whole["metrics"])


def _run_argv(argv, out):
    assert main(["eval", *argv, "--output", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["qa", "tiny"])
def test_integrity_resumes_after_its_last_row(data_dir, tmp_path, monkeypatch, mode):
    """Interrupted after 5 injections (rows every 2), resumed: the rows equal an unbroken run's; only the latest
    memory checkpoint is kept."""
    from memoryllm_hf.evaluation import integrity

    extra = ["--updates", "7", "--record-every", "2", "--probe", "teacher-forced"]
    extra += ["--tiny"] if mode == "tiny" else []
    whole = _run("integrity", data_dir, tmp_path / "whole.json", *extra)
    statistics, calls = integrity.memory_statistics, []

    def interrupted(model):
        calls.append(model.num_injections)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return statistics(model)

    monkeypatch.setattr(integrity, "memory_statistics", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run("integrity", data_dir, tmp_path / "cut.json", *extra)
    monkeypatch.setattr(integrity, "memory_statistics", statistics)
    kept = sorted(path.name for path in tmp_path.glob("cut.records.jsonl.memory-*"))
    assert kept == ["cut.records.jsonl.memory-4.safetensors"]
    resumed = _run("integrity", data_dir, tmp_path / "cut.json", *extra, "--resume")
    assert [row["injections"] for row in resumed["rows"]] == [2, 4, 6, 7]
    assert _drop_times(resumed["rows"]) == _drop_times(whole["rows"])
    assert _drop_times(resumed["metrics"]) == _drop_times(whole["metrics"])


def test_a_run_resumes_from_a_moved_data_folder_but_not_from_changed_files(data_dir, tmp_path):
    """The data folder may move between sittings (another machine, another checkout): the header's file hashes, not
    its path, say whether it is the same data; a changed file is refused."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    out, extra = tmp_path / "i.json", ["--updates", "2", "--record-every", "1"]
    first = _run("integrity", data_dir, out, *extra)
    again = _run("integrity", moved, out, *extra, "--resume")
    assert _drop_times(again["rows"]) == _drop_times(first["rows"])
    with open(moved / "squad_qa.jsonl", "a") as handle:
        handle.write(json.dumps({"id": "new", "context": "c", "question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="cannot resume .*squad_qa.jsonl"):
        _run("integrity", moved, out, *extra, "--resume")


def test_shard_option_is_checked(data_dir, tmp_path):
    from memoryllm_hf.evaluation.records import parse_shard

    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="cannot be split into shards"):
        _run("integrity", data_dir, tmp_path / "i.json", "--updates", "1", "--shard", "0/2")


# ---------------------------------------------------------------- damaged logs, the lock


def _three_records(path):
    from memoryllm_hf.evaluation.records import RecordLog

    log = RecordLog(path, {"task": "t"})
    for index, key in enumerate("abc"):
        log.add(key, index, {"score": 0.0, "text": f"answer {key}"})
    log.close()
    return path.read_bytes().split(b"\n")


def _edited(line: bytes) -> bytes:
    entry = json.loads(line)
    entry["record"]["score"] = 1.0  # the checksum field (if any) is kept as it was
    return json.dumps(entry).encode()


DAMAGES = {
    "zeroed": lambda line: b"\x00" * len(line),
    "cut": lambda line: line[: len(line) // 2],
    "invalid utf-8": lambda line: line.replace(b"answer b", b"answer \xff\xfe"),
    "not a record": lambda line: b'{"note": "hello"}',
    "null record": lambda line: b'{"key": "b", "index": 1, "record": null}',
    "edited value": _edited,
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_log_line_is_named_and_its_item_computed_again(tmp_path, damage):
    """Line 3 (item "b") damaged: resuming warns with FILE:3, keeps a and c, and lists b as still to do."""
    from memoryllm_hf.evaluation.records import RecordLog

    path = tmp_path / "run.records.jsonl"
    lines = _three_records(path)
    lines[2] = DAMAGES[damage](lines[2])
    path.write_bytes(b"\n".join(lines))
    with pytest.warns(UserWarning, match=f"{path}:3: .*computed again"):
        log = RecordLog(path, {"task": "t"}, resume=True)
    with log:
        assert log.get("a") == {"score": 0.0, "text": "answer a"} and log.get("c") is not None
        assert list(log.pending(["a", "b", "c"], desc="test", unit="item")) == [1]
        log.add("b", 1, {"score": 0.0, "text": "answer b"})
        assert [r["text"] for r in log.records("abc")] == ["answer a", "answer b", "answer c"]


def test_a_damaged_header_is_refused_with_file_and_line(tmp_path):
    from memoryllm_hf.evaluation.records import RecordLog

    path = tmp_path / "run.records.jsonl"
    lines = _three_records(path)
    path.write_bytes(b"\n".join([_edited_header(lines[0]), *lines[1:]]))
    with pytest.raises(ValueError, match=f"{path}:1: .*checksum"):
        RecordLog(path, {"task": "t"}, resume=True)


def _edited_header(line: bytes) -> bytes:
    entry = json.loads(line)
    entry["header"]["task"] = "other"
    return json.dumps(entry).encode()


def test_a_resumed_log_counts_the_cost_of_every_sitting(tmp_path, monkeypatch):
    """Each record line carries the run's wall and CPU seconds so far; a resumed run adds this sitting's to the last
    line's (what a sitting spent after its last record is not counted); a damaged last line does not count."""
    from memoryllm_hf.evaluation import records

    clock = {"wall": 100.0, "cpu": 10.0}
    monkeypatch.setattr(records.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(records.time, "process_time", lambda: clock["cpu"])
    path = tmp_path / "run.records.jsonl"
    with records.RecordLog(path, {"task": "t"}) as log:
        clock.update(wall=110.0, cpu=14.0)
        log.add("a", 0, {"x": 1})
        clock.update(wall=130.0, cpu=20.0)
        log.add("b", 1, {"x": 2})
        clock.update(wall=900.0, cpu=90.0)  # (stopped before its next record: not counted)
    assert records.log_spent(path) == {"records": 2, "wall_s": 30.0, "cpu_s": 10.0, "sittings": 1}
    clock.update(wall=5000.0, cpu=500.0)
    with records.RecordLog(path, {"task": "t"}, resume=True) as log:
        clock.update(wall=5040.0, cpu=505.0)
        log.add("c", 2, {"x": 3})
        assert log.spent() == {"wall_s": 70.0, "cpu_s": 15.0, "sittings": 2}
    assert records.log_spent(path) == {"records": 3, "wall_s": 70.0, "cpu_s": 15.0, "sittings": 2}
    lines = path.read_bytes().split(b"\n")
    lines[-2] = lines[-2].replace(b'"x": 3', b'"x": 4')  # the last record line damaged: its cost is not taken
    path.write_bytes(b"\n".join(lines))
    assert records.log_spent(path)["wall_s"] == 30.0
    assert records.log_spent(tmp_path / "none.records.jsonl") is None


def test_two_resumes_of_one_log_are_refused(tmp_path):
    """While one run holds the log, a second start or resume is refused; after it closes, resuming works."""
    import subprocess
    import sys

    from memoryllm_hf.evaluation.records import RecordLog

    path = tmp_path / "run.records.jsonl"
    _three_records(path)
    first = RecordLog(path, {"task": "t"}, resume=True)
    with pytest.raises(RuntimeError, match="another run"):
        RecordLog(path, {"task": "t"}, resume=True)
    script = (
        "import sys\nfrom memoryllm_hf.evaluation.records import RecordLog\n"
        "try:\n    RecordLog(sys.argv[1], {'task': 't'}, resume=True)\nexcept RuntimeError as err:\n"
        "    print(err)\n    sys.exit(3)\n"
    )
    other = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert other.returncode == 3 and "another run" in other.stdout
    first.close()
    with RecordLog(path, {"task": "t"}, resume=True) as again:
        assert again.get("c") is not None


def test_an_edited_record_does_not_change_the_resumed_metrics(data_dir, tmp_path):
    """The issue's case: a value edited inside a finished record of a real run's log. Resuming names the line,
    recomputes that record and reproduces the unedited run's metrics."""
    args = ("--max-new-tokens", "2", "--prompt-style", "chat")
    whole = _run("longcontext", data_dir, tmp_path / "whole.json", *args)
    log = tmp_path / "whole.records.jsonl"
    lines = log.read_bytes().split(b"\n")
    entry = json.loads(lines[2])
    entry["record"]["memory"]["chat"]["f1"] = 0.5
    lines[2] = json.dumps(entry).encode()
    log.write_bytes(b"\n".join(lines))
    (tmp_path / "whole.json").unlink()
    with pytest.warns(UserWarning, match=f"{log}:3: checksum mismatch"):
        resumed = _run("longcontext", data_dir, tmp_path / "whole.json", *args, "--resume")
    assert _drop_times(resumed["metrics"]) == _drop_times(whole["metrics"])
    assert _drop_times(resumed["records"]) == _drop_times(whole["records"])


def test_editing_with_retrieval_reads_records_whether_each_probe_read_the_edit(data_dir, tmp_path):
    """Single and sequential edits with read_mode="retrieve": each memory probe says whether its prompt read the
    edit's own injections; the summaries carry that rate with an interval; the other conditions do not read."""
    from memoryllm_hf.evaluation.models import config_fields
    from memoryllm_hf.modeling import MemoryLlamaConfig

    if "read_mode" not in config_fields(MemoryLlamaConfig):
        pytest.skip("this model has no retrieval reads")
    args = ("--sequential", "--prompt-style", "plain", "--read-mode", "retrieve")
    args += ("--set", "long_term_memory_tokens=256")
    result = _run("editing", data_dir, tmp_path / "e.json", *args)
    for record in result["records"]:
        probes = record["memory"]["plain"]
        assert all(isinstance(p["read_edit"], bool) and "read_nothing" in p for kind in probes.values() for p in kind)
        assert all(p["read_edit"] for p in probes["efficacy"])  # one edit stored: every read holds it
        assert "read_edit" not in record["no_edit"]["plain"]["efficacy"][0]
    sequential = result["sequential"]["records"]
    assert all("read_edit" in p for r in sequential for kind in r["plain"].values() for p in kind)
    summary = result["metrics"]["plain"]["memory"]
    assert summary["efficacy_read_edit"] == 1.0 and summary["efficacy_read_edit_ci"][1] == 1.0
    assert "efficacy_read_edit" in result["sequential"]["metrics"]["plain"]


# ---------------------------------------------------------------- the plan (GPU path) and the README's tables


def test_the_plan_runs_on_the_cpu_when_capped(data_dir, tmp_path, capsys):
    """The full plan at a cap of 2 on the tiny model: one run of one read mode in bfloat16 (the GPU path's dtype) on
    the CPU, then every run once for both read modes; a second start skips finished runs; --dry-run lists every run
    with all the default model's read modes."""
    from memoryllm_hf.evaluation.plan import default_read_modes, plan
    from memoryllm_hf.evaluation.plan import main as plan_main

    common = ["--model", "tiny", "--data", str(data_dir), "--cap", "2", "--out-dir", str(tmp_path)]
    common += ["--set", "long_term_memory_tokens=256", "--device", "cpu"]
    retrieve = ["--read-modes", "retrieve", "--only", "longcontext-hotpotqa", "--dtype", "bfloat16"]
    assert plan_main([*common, *retrieve]) == 0
    bf16 = json.loads((tmp_path / "longcontext-hotpotqa.json").read_text())
    assert bf16["model"]["dtype"] == "bfloat16" and bf16["model"]["read"]["read_mode"] == "retrieve"
    assert "by_read_mode" not in bf16
    both = ["--read-modes", "pool", "retrieve"]
    assert plan_main([*common, *both]) == 0
    runs = set(plan(["pool", "retrieve"]))
    assert {"retention-nq", "editing-counterfact", "integrity-smollm2", "integrity-tiny-1m"} <= runs
    assert {path.stem for path in tmp_path.glob("*.json")} == runs
    editing = json.loads((tmp_path / "editing-counterfact.json").read_text())
    assert editing["read_modes"] == ["pool", "retrieve"] and set(editing["by_read_mode"]) == {"pool", "retrieve"}
    capsys.readouterr()
    assert plan_main([*common, *both]) == 0
    assert capsys.readouterr().out.count("exists, skipped") == len(runs)
    assert plan_main([*common, "--cost"]) == 0  # each run's cost over its sittings, and the plan's total
    cost = capsys.readouterr().out.splitlines()
    assert len(cost) == len(runs) + 1 and all("finished" in line and "CPU h" in line for line in cost[:-1])
    from memoryllm_hf.evaluation.records import log_spent

    spent = [log_spent(tmp_path / f"{name}.records.jsonl") for name in runs]
    assert all(one["cpu_s"] > 0 and one["sittings"] == 1 for one in spent)
    assert cost[-1] == f"total: {sum(one['cpu_s'] for one in spent) / 3600:.2f} CPU h recorded (records written " \
        "before costs were recorded are not counted)"
    assert plan_main([*common, "--out-dir", str(tmp_path / "new"), "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in listed] == list(plan())
    assert {"pool", "retrieve"} <= set(default_read_modes())
    modes = " ".join(default_read_modes())
    assert all(f"--read-modes {modes} " in line for line in listed if not line.startswith("integrity-tiny"))


def test_a_run_held_by_another_process_is_skipped_and_the_plan_goes_on(data_dir, tmp_path, capsys):
    """Two plan processes share the runs: a run whose record log another process holds is left to it (nothing of
    it is read or written), and the plan goes on with the next run."""
    from filelock import FileLock

    from memoryllm_hf.evaluation.plan import main as plan_main

    common = ["--model", "tiny", "--data", str(data_dir), "--cap", "2", "--out-dir", str(tmp_path), "--device", "cpu"]
    common += ["--set", "long_term_memory_tokens=256", "--read-modes", "retrieve"]
    held = FileLock(f"{tmp_path / 'editing-zsre.records.jsonl'}.lock")
    with held.acquire(timeout=0):
        assert plan_main([*common, "--only", "editing-zsre", "longcontext-hotpotqa"]) == 0
    assert "editing-zsre: its record log is held by another run, skipped" in capsys.readouterr().out
    assert (tmp_path / "longcontext-hotpotqa.json").exists()
    assert not (tmp_path / "editing-zsre.records.jsonl").exists() and not (tmp_path / "editing-zsre.json").exists()


def test_the_readme_tables_are_the_report_of_the_result_files():
    """The README's evaluation tables are generated: regenerating them from docs/results gives the README."""
    from pathlib import Path

    from memoryllm_hf.evaluation.report import readme

    root = Path(__file__).resolve().parents[1]
    assert "<!-- report: " in (root / "README.md").read_text()
    assert readme(root / "README.md", check=True), "run python -m memoryllm_hf.evaluation.report --readme README.md"


def test_report_blocks_are_regenerated_from_their_files(data_dir, tmp_path):
    from memoryllm_hf.evaluation.report import readme, report

    _run("longcontext", data_dir, tmp_path / "lc.json", "--max-new-tokens", "2", "--prompt-style", "chat")
    page = tmp_path / "PAGE.md"
    page.write_text("intro\n<!-- report: lc.json -->\nstale table\n<!-- /report -->\nend\n")
    assert not readme(page, check=True) and "stale table" in page.read_text()
    assert not readme(page)
    assert page.read_text() == f"intro\n<!-- report: lc.json -->\n{report('lc.json', tmp_path)}<!-- /report -->\nend\n"
    assert readme(page, check=True)
    assert "F1 [95%]" in page.read_text() and "[0.00, " in page.read_text()

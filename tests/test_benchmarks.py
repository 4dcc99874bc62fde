"""Smoke tests of the benchmark scripts (each starts on the tiny model and prints its table), and checks that the
performance rewrites of the memory pool and prefix cache keep their exact behaviour."""

import importlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, MistralConfig

from memoryllm_hf.modeling.memory_pool import kept_slot_indices
from memoryllm_hf.modeling.memory_prefix import prefix_key_values, seeded_cache
from memoryllm_hf.tiny import tiny_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--threads", "1", "--repeats", "1"]


@pytest.fixture
def run_script(monkeypatch, tmp_path, capsys):
    """Runs `benchmarks.<name>.main(args)` on the tiny model; returns (printed text, JSON results)."""
    monkeypatch.syspath_prepend(str(REPO))

    def run(name: str, *args: str) -> tuple[str, dict]:
        result = tmp_path / f"{name}.json"
        importlib.import_module(f"benchmarks.{name}").main([*TINY, *args, "--json", str(result)])
        return capsys.readouterr().out, json.loads(result.read_text())

    return run


def assert_table(printed: str, name: str, columns: tuple[str, ...], rows: int) -> None:
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(f"# {name}: tiny"))
    assert lines[header + 1].split() == list(columns)
    assert len(lines) >= header + 2 + rows


def test_read_prints_ratios_and_never_recomputes_memory_kv(run_script, tmp_path):
    from benchmarks.read import COLUMNS

    printed, result = run_script(
        "read", "--memory-tokens", "64", "--prompt-tokens", "4", "8", "--new-tokens", "3", "--update-tokens", "8"
    )
    assert_table(printed, "read", COLUMNS, rows=2)
    assert [(row["N"], row["n"]) for row in result["rows"]] == [(64, 4), (64, 8)]
    assert all(row["kv_recomputed"] == 0 for row in result["rows"])
    assert all(row["vs_limit"] > 0 and row["decode_tok_s"] > 0 for row in result["rows"])
    from benchmarks.markdown import render

    assert render(tmp_path / "read.json").splitlines()[2] == "| " + " | ".join(COLUMNS) + " |"


def test_read_limit_computes_what_the_memory_model_computes(monkeypatch):
    """The limit is a fair comparison: the plain Llama over the cached prefix gives our logits, every repeat."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.common import Run, common_parser, fill_pool, load_model, plain_llama
    from benchmarks.read import ReadCell

    run = Run("read", common_parser("test").parse_args(TINY))
    model = load_model(run, 64, 8, "input")
    fill_pool(model)
    cell = ReadCell(run, model, plain_llama(model), 5)
    with torch.no_grad():
        for _ in range(2):
            cell.rewind_limit_cache()
            torch.testing.assert_close(cell.limit_prefill().logits, model(cell.prompt, logits_to_keep=1).logits)


def test_inject_prints_both_update_rules(run_script):
    from benchmarks.inject import COLUMNS

    printed, result = run_script(
        "inject", "--memory-tokens", "64", "--context-tokens", "4", "16", "--update-tokens", "8"
    )
    assert_table(printed, "inject", COLUMNS, rows=4)
    assert [(row["rule"], row["n"]) for row in result["rows"]] == [
        ("output", 4),
        ("output", 16),
        ("input", 4),
        ("input", 16),
    ]
    assert all(0 < row["drop_share"] for row in result["rows"])


def test_footprint_pool_follows_the_model_dtype(run_script):
    from benchmarks.footprint import COLUMNS

    printed, result = run_script(
        "footprint", "--memory-tokens", "256", "--update-tokens", "8", "--accuracy-memory-tokens", "64"
    )
    assert_table(printed, "footprint", COLUMNS, rows=2)
    fp32, bf16 = result["rows"]
    assert (fp32["pool_dtype"], bf16["pool_dtype"]) == ("float32", "bfloat16")
    assert bf16["pool_MB"] == fp32["pool_MB"] / 2
    assert [row["compared"] for row in result["pool_precision"]] == ["bf16 pool, fp32 model", "bf16 model and pool"]


def test_scale_prints_and_plots(run_script, tmp_path):
    from benchmarks.scale import COLUMNS

    plot = tmp_path / "scale.png"
    printed, result = run_script("scale", "--memory-tokens", "64", "128", "--update-tokens", "8", "--plot", str(plot))
    assert_table(printed, "scale", COLUMNS, rows=2)
    assert [row["N"] for row in result["rows"]] == [64, 128]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from benchmarks.scale import main

    main(["--replot", str(tmp_path / "scale.json"), "--plot", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@settings(max_examples=60, deadline=None)
@given(
    num_slots=st.integers(1, 300),
    data=st.data(),
    per_layer=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_kept_slot_indices_match_sorting_the_random_permutation(num_slots, data, per_layer, seed):
    """The linear-time survivor selection equals the definition: the first survivors of a randperm, sorted."""
    filled = data.draw(st.integers(0, num_slots))
    dropped = data.draw(st.integers(1, num_slots))
    num_layers = 3
    keep = kept_slot_indices(num_slots, filled, dropped, num_layers, per_layer, torch.Generator().manual_seed(seed))
    empty = num_slots - filled
    from_filled = dropped - min(empty, dropped)
    generator = torch.Generator().manual_seed(seed)
    if from_filled == 0:
        expected = torch.arange(min(empty, dropped), num_slots).expand(num_layers, -1)
    else:
        draws = [
            torch.randperm(filled, generator=generator)[: filled - from_filled].sort().values + empty
            for _ in range(num_layers if per_layer else 1)
        ]
        expected = torch.stack(draws).expand(num_layers, -1)
    assert torch.equal(keep, expected)


def prefix_for(config, length: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (1, config.num_key_value_heads, length, config.hidden_size // config.num_attention_heads)
    return [(torch.randn(shape), torch.randn(shape)) for _ in range(config.num_hidden_layers)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_seeded_cache_builds_the_llama_layers_directly_without_copying(batch_size):
    config = tiny_config()
    prefix = prefix_for(config)
    cache = seeded_cache(config, prefix, batch_size)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5
    assert [type(layer) for layer in cache.layers] == [type(layer) for layer in DynamicCache(config=config).layers]
    for layer, (keys, values) in zip(cache.layers, prefix, strict=True):
        assert layer.keys.shape[0] == layer.values.shape[0] == batch_size
        assert layer.keys.data_ptr() == keys.data_ptr() and layer.values.data_ptr() == values.data_ptr()


def test_prefix_key_values_are_contiguous_so_prefill_concatenation_is_a_plain_copy(output_model):
    model = output_model
    prefix = list(torch.randn(model.config.num_hidden_layers, 7, model.config.hidden_size))
    for keys, values in prefix_key_values(model.model.layers, model.model.rotary_emb, prefix):
        assert keys.is_contiguous() and values.is_contiguous()
        assert keys.shape == values.shape == (1, model.config.num_key_value_heads, 7, model.config.head_dim)


def test_seeded_cache_keeps_the_config_layers_for_sliding_windows():
    config = MistralConfig(sliding_window=4, num_hidden_layers=2)
    cache = seeded_cache(config, prefix_for(config), 1)
    assert [type(layer) for layer in cache.layers] == [type(layer) for layer in DynamicCache(config=config).layers]


def test_batched_read_prints_the_ratio_and_equal_outputs(run_script):
    from benchmarks.batched_read import COLUMNS

    printed, result = run_script(
        "batched_read", "--memory-tokens", "64", "--update-tokens", "8", "--questions", "3", "--new-tokens", "3"
    )
    assert_table(printed, "batched_read", COLUMNS, rows=1)
    (row,) = result["rows"]
    assert row["questions"] == 3 and row["outputs_equal"] is True
    assert row["batched_vs_one_by_one"] > 0 and row["copy_vs_one_by_one"] > 0
    assert row["cache_MB"] < row["copy_cache_MB"]  # the shared batch holds the memory keys/values once


def test_retrieve_read_prints_the_ratio_per_store_size(run_script, tmp_path):
    from benchmarks.retrieve_read import COLUMNS

    plot = tmp_path / "retrieve.png"
    printed, result = run_script(
        "retrieve_read", "--memory-tokens", "24", "--update-tokens", "6", "--stored", "3", "12", "--plot", str(plot)
    )
    assert_table(printed, "retrieve_read", COLUMNS, rows=2)
    assert [row["stored_tokens"] for row in result["rows"]] == [18, 72]
    assert all(row["retrieve_vs_pool"] > 0 for row in result["rows"]) and plot.stat().st_size > 0


def test_lexical_recall_breaks_down_what_unrelated_questions_read(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.lexical_recall import holds_answer, unrelated_breakdown

    assert holds_answer(["Wales", ""], "It arose in England and\n WALES.") and not holds_answer(["Scotland"], "Wales")
    # four questions: one reads nothing, two read block 7 (one of them also an answer-holding block 3), one block 5
    reads = [[], [(7, False)], [(7, False), (3, True)], [(5, False)]]
    row = unrelated_breakdown(reads)
    assert row["read"] == 0.75 and row["read_a_block_holding_an_answer"] == 0.25
    assert row["read_only_blocks_without_an_answer"] == 0.5 and row["most_read_block_share"] == 0.5
    assert unrelated_breakdown([[(1, False), (1, False)]])["most_read_block_share"] == 1.0
    assert unrelated_breakdown([[(3, True)], [(4, False), (3, True)]])["read_a_block_holding_an_answer"] == 1.0


def test_lexical_recall_takes_unrelated_questions_from_another_set(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.lexical_recall import dev_case

    def write(name, rows):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    write("nq_qa", [{"question": f"nq {i}", "context": f"nq passage {i}", "answers": ["x"]} for i in range(6)])
    write("nq_passages", [{"text": f"nq passage {i}"} for i in range(10)])
    write("squad_qa", [{"question": f"squad {i}", "context": f"squad passage {i}", "answers": ["y"]} for i in range(4)])
    asked, unasked, others = dev_case("nq", tmp_path, tmp_path, 3, 2, 8, 0)
    assert all(row["question"].startswith("nq") for row in unasked)
    asked2, unasked2, others2 = dev_case("nq", tmp_path, tmp_path, 3, 2, 8, 0, "squad")
    assert asked2 == asked and len(unasked2) == 2
    assert all(row["question"].startswith("squad") for row in unasked2)
    assert not {row["context"] for row in asked2} & set(others2)

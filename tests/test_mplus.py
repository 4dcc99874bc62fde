"""M+ (read_mode="mplus") beyond the official recordings: the update rule's edge cases, deterministic ties, batches
equal to their rows, attention masks, eager == sdpa, bfloat16, generate features, saving and loading the long-term
memory, and conversion of bad M+ folders."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from memoryllm_hf.convert import convert_official
from memoryllm_hf.hub import hub_endpoint
from memoryllm_hf.modeling import MemoryLlamaForCausalLM
from memoryllm_hf.modeling.memory_state import MemoryState, MemoryStateError
from memoryllm_hf.modeling.mplus_memory import (
    MPlusMemory,
    empty_mplus_memory,
    merged,
    read_order,
    retrieval_scores,
    top_candidates,
)
from memoryllm_hf.testing import LocalHub

GOLDEN = Path(__file__).parent / "fixtures" / "official_mplus_tiny"


def fill(model) -> None:
    """The golden timeline's four injections (the long-term memory then holds merged and pending slots)."""
    expected = load_file(GOLDEN / "expected.safetensors")
    drawer = torch.Generator().manual_seed(1234)
    for t in range(1, 5):
        model.inject(expected[f"ctx_ids_{t}"], generator=drawer)


def load(folder, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    model.config.min_inject_tokens = 1
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_official(GOLDEN, tmp_path_factory.mktemp("mplus") / "converted")


@pytest.fixture
def model(converted):
    model = load(converted)
    fill(model)
    return model


# ---------------------------------------------------------------------------------------------- pure rules
def one_layer(recall: list[float], pending: int) -> MPlusMemory:
    memory = empty_mplus_memory(1, 4, 2, 3)
    S = len(recall)
    return dataclasses.replace(
        memory,
        slots=(torch.arange(2.0 * S).view(S, 2),),
        keys=(torch.zeros(S, 3),),
        ages=(torch.arange(S),),
        recall=(torch.tensor(recall, dtype=torch.float64),),
        pending_slots=torch.full((1, pending, 2), -1.0),
        pending_keys=torch.zeros(1, pending, 3),
        pending_ages=torch.zeros(1, pending, dtype=torch.long),
    )


def test_merge_evicts_only_when_more_than_read_tokens_survive():
    memory = one_layer([1.0, 3.0, 1.0], pending=2)
    after = merged(memory, read_tokens=2, recall_initial=10.0, recall_decay=1.0)  # 3 survive > 2: evict
    assert after.slot_counts == [3] and after.num_pending == 0
    assert after.recall[0].tolist() == [2.0, 9.0, 9.0] and after.ages[0].tolist() == [1, 0, 0]
    kept = merged(memory, read_tokens=3, recall_initial=10.0, recall_decay=1.0)  # only 3 survive: nobody leaves
    assert kept.slot_counts == [5] and kept.recall[0].tolist() == [1.0, 3.0, 1.0, 10.0, 10.0]


def test_ties_have_a_documented_order():
    scores = torch.tensor([0.5, 0.7, 0.5, 0.5, 0.1])
    assert top_candidates(scores, 2).tolist() == [0, 1]  # equal scores at the boundary: the lower index
    assert top_candidates(scores, 9).tolist() == [0, 1, 2, 3, 4]
    # age descending (oldest first); equal ages: the higher index first (stable argsort, reversed)
    assert read_order(torch.tensor([2, 5, 7, 9]), torch.tensor([3, 3, 8, 1])).tolist() == [7, 5, 2, 9]


def test_scores_of_a_padded_row_equal_the_row_alone():
    queries, keys = torch.randn(2, 5, 3), torch.randn(7, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    scores = retrieval_scores(queries, mask, keys)
    assert torch.allclose(scores[0], retrieval_scores(queries[:1, 2:], mask[:1, 2:], keys)[0], atol=1e-6)
    assert torch.allclose(scores[1], torch.sigmoid(queries[1] @ keys.T).mean(0), atol=1e-6)


# ---------------------------------------------------------------------------------------------- reads
@torch.no_grad()
def test_left_padded_batch_equals_its_rows(model):
    rows = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]).long() for r in rows])
    logits = model(ids, attention_mask=mask).logits
    orders = [o.clone() for o in model.last_retrieval.order]
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for i, row in enumerate(rows):
        single = model(row[None]).logits
        assert (logits[i, -len(row) :] - single[0]).abs().max() < 1e-5
        for layer, order in enumerate(model.last_retrieval.order):
            assert torch.equal(orders[layer][i], order[0])  # every row retrieves for itself
        alone = model.generate(row[None], max_new_tokens=5, do_sample=False)
        assert torch.equal(batched[i, width:], alone[0, len(row) :])
    assert len({tuple(o[0].tolist()) for o in orders} | {tuple(o[1].tolist()) for o in orders}) > 2


@torch.no_grad()
def test_padding_tokens_do_not_change_a_read(model):
    row = torch.randint(3, 256, (6,), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.full((3,), 77), row])[None]
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    assert (model(padded, attention_mask=mask).logits[0, 3:] - model(row[None]).logits[0]).abs().max() < 1e-5
    assert (model(padded).logits[0, 3:] - model(row[None]).logits[0]).abs().max() > 1e-4  # the mask matters


@torch.no_grad()
def test_eager_attention_equals_sdpa(converted, model):
    eager = load(converted, attn_implementation="eager")
    fill(eager)
    prompt = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    assert (eager(prompt).logits - model(prompt).logits).abs().max() < 1e-5


@torch.no_grad()
def test_bfloat16_reads_close_to_float32(converted, model):
    half = load(converted, dtype=torch.bfloat16)
    fill(half)
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    logits = half(prompt).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - model(prompt).logits).abs().max() < 0.05


@torch.no_grad()
def test_decoding_continues_the_prefill_retrieval(model):
    """Decode steps reuse what the prefill retrieved (as the official code): generate == prefill + cached steps,
    and a later call continues from the returned cache."""
    prompt = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    step = model(prompt, use_cache=True)
    cache = step.cache
    for index, logits in enumerate(out.logits):
        assert (step.logits[:, -1] - logits).abs().max() < 1e-5
        token = out.sequences[:, prompt.shape[1] + index][:, None]
        step = model(token, cache=cache, use_cache=True)
    more = model.generate(out.sequences, cache=out.cache, max_new_tokens=2, do_sample=False)
    assert torch.equal(more[:, : out.sequences.shape[1]], out.sequences) and more.shape[1] == out.sequences.shape[1] + 2


@torch.no_grad()
def test_beams_and_sampling(model):
    prompt = torch.randint(3, 256, (2, 4), generator=torch.Generator().manual_seed(3))
    beams = model.generate(prompt, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, 8)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=4, do_sample=True, top_k=10, num_return_sequences=2)
    assert sampled.shape == (4, 8)


# ---------------------------------------------------------------------------------------------- memory on disk
@torch.no_grad()
def test_save_and_load_keep_the_long_term_memory(model, tmp_path):
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    model.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved")
    assert again.long_term_memory.content_hash() == model.long_term_memory.content_hash()
    assert again.long_term_memory.num_pending == 4  # pending slots survive a save
    assert torch.equal(again(prompt).logits, model(prompt).logits)
    drawer = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 256, (5,), generator=drawer)
    model.inject(ids, generator=torch.Generator().manual_seed(9))
    again.inject(ids, generator=torch.Generator().manual_seed(9))
    assert again.long_term_memory.content_hash() == model.long_term_memory.content_hash()


def test_save_memory_of_an_m_plus_model_is_a_full_save_never_a_journal_record(model, tmp_path):
    """The journal records pool updates only; an M+ write also changes its long-term memory (merges, pending
    slots), so every `save_memory` of an M+ model rewrites the memory files (and the folder holds no journal)."""
    from memoryllm_hf.modeling.memory_files import JOURNAL_DIR, LONG_TERM_FILE

    model.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved")
    store_file = (tmp_path / "saved" / LONG_TERM_FILE).stat()
    again.inject(torch.randint(3, 256, (5,), generator=torch.Generator().manual_seed(9)),
                 generator=torch.Generator().manual_seed(9))
    again.save_memory(tmp_path / "saved")
    assert not (tmp_path / "saved" / JOURNAL_DIR).exists()
    assert (tmp_path / "saved" / LONG_TERM_FILE).stat().st_ino != store_file.st_ino  # rewritten
    reloaded = load(tmp_path / "saved")
    assert reloaded.long_term_memory.content_hash() == again.long_term_memory.content_hash()
    assert reloaded.memory_state().content_hash() == again.memory_state().content_hash()


def test_a_missing_or_damaged_long_term_memory_is_refused(model, tmp_path):
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    store = folder / "long_term_memory.safetensors"
    tensors = load_file(store)
    tensors["mplus_ages"] = tensors["mplus_ages"] + 1
    with safe_open(store, "pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, store, metadata=metadata)
    with pytest.raises(ValueError, match="corrupted"):
        load(folder)
    store.unlink()
    with pytest.raises(ValueError, match="no long_term_memory.safetensors"):
        load(folder)


def test_memory_states_snapshots_and_undo_carry_the_long_term_memory(model, tmp_path):
    before = model.memory_state()
    model.snapshot("before")
    model.inject(torch.randint(3, 256, (6,)))
    assert model.long_term_memory.content_hash() != before.long_term.content_hash()
    model.undo()
    assert model.long_term_memory.content_hash() == before.long_term.content_hash()
    model.inject(torch.randint(3, 256, (6,)))
    model.restore("before")
    assert model.long_term_memory.content_hash() == before.long_term.content_hash()
    before.save(tmp_path / "state.safetensors")
    loaded = MemoryState.load(tmp_path / "state.safetensors")
    assert loaded.long_term.content_hash() == before.long_term.content_hash()
    model.reset_memory()
    assert model.long_term_memory.slot_counts == [0, 0]
    model.load_memory_state(loaded)
    assert model.long_term_memory.content_hash() == before.long_term.content_hash()
    fields = {**model.config.to_dict(), "retriever_size": 0, "read_mode": "pool"}
    plain = MemoryLlamaForCausalLM(type(model.config)(**fields))
    with pytest.raises(MemoryStateError, match="another kind of model"):
        plain.load_memory_state(loaded, allow_other_model=True)


# ---------------------------------------------------------------------------------------------- bad M+ folders
def broken_copy(tmp_path: Path, drop=(), config=None, change=None) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(GOLDEN, folder)
    weights = load_file(folder / "model.safetensors")
    for key in [k for k in weights if any(k.startswith(d) or d in k for d in drop)]:
        del weights[key]
    if change:
        weights.update(change)
    save_file(weights, folder / "model.safetensors")
    if config:
        data = json.loads((folder / "config.json").read_text())
        data.update(config)
        (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"drop": ("ltm.1", "ltm_keys.", "ltm_ages.", "ltm_recall_frequencies.")}, "without its long-term memory"),
        ({"drop": ("self_attn.query_proj",)}, "without its retriever projectors"),
        ({"config": {"update_ltm_mode": "lazy"}}, "update_ltm_mode='lazy'"),
        ({"change": {"ltm_keys.0": torch.zeros(12, 8)}}, "belongs to another model"),
    ],
    ids=["no long-term memory", "no projectors", "update_ltm_mode", "other model's memory"],
)
def test_bad_mplus_folders_are_refused_and_nothing_is_written(tmp_path, broken, message):
    folder = broken_copy(tmp_path, **broken)
    with pytest.raises(ValueError, match=message):
        convert_official(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the Hub
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running local Hub that this process's Hub client talks to (fresh download cache, test token)."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub() as server, hub_endpoint(server.url, cache_dir=tmp_path / "hf-cache", token="local-test-token"):
        yield server


@torch.no_grad()
def test_hub_pushes_carry_the_long_term_memory(model, hub):
    """A whole-model push, then a memory-only push on a branch: each revision loads its own M+ long-term memory."""
    repo = "tester/mplus"
    model.push_to_hub(repo)
    first = model.long_term_memory.content_hash()
    assert load(repo).long_term_memory.content_hash() == first
    model.inject(torch.randint(3, 256, (6,), generator=torch.Generator().manual_seed(1)))
    model.push_memory_to_hub(repo, revision="later", create_branch=True)
    later = load(repo, revision="later")
    assert later.long_term_memory.content_hash() == model.long_term_memory.content_hash() != first
    later.load_memory_from_hub(repo)  # main: the first memory again
    assert later.long_term_memory.content_hash() == first
    files = {f.path for f in HfApi().list_repo_tree(repo, revision="later")}
    assert {"memory.safetensors", "long_term_memory.safetensors", "memory_state.json"} <= files


@torch.no_grad()
def test_one_pass_read_equals_the_seeded_cache_read(model):
    """A plain forward reads in one pass; with outputs the one pass does not give (hidden states) the retrieval pass
    seeds a cache and the stock forward reads it: the same logits, and the one pass's cache continues alike."""
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    fast = model(prompt, attention_mask=mask)
    slow = model(prompt, attention_mask=mask, output_hidden_states=True)
    assert slow.hidden_states is not None and (fast.logits - slow.logits).abs().max() < 1e-5
    token = torch.tensor([[5], [9]])
    full = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    after_fast = model(token, cache=fast.cache, attention_mask=full).logits
    after_slow = model(token, cache=slow.cache, attention_mask=full).logits
    assert (after_fast - after_slow).abs().max() < 1e-5


def test_stats_shows_the_mplus_long_term_memory(converted, capsys):
    from memoryllm_hf.cli import main

    assert main(["stats", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "long-term     M+: [12, 12] slots per layer, 0 pending" in out


# ---------------------------------------------------------------------------------------------- PEFT
def test_peft_lora_on_top_of_an_mplus_model(model):
    """LoRA on top of a converted M+ model trains on M+ reads (labels: the seeded-cache path) while the memory, the
    long-term memory and the built-in adapters stay as they were; the wrapper reads and generates."""
    from peft import LoraConfig, get_peft_model

    state, memory = model.memory_state(), model.long_term_memory.content_hash()
    builtin = {n: p.clone() for n, p in model.named_parameters() if ".adapter_" in n}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    question = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=question, labels=question).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    assert losses[-1] < losses[0]
    assert model.long_term_memory.content_hash() == memory and torch.equal(model.memory, state.memory)
    assert all(torch.equal(p, builtin[n]) for n, p in model.named_parameters() if n in builtin)
    with torch.no_grad():
        assert peft_model.generate(input_ids=question, max_new_tokens=3, do_sample=False).shape == (1, 11)


@torch.no_grad()
def test_streamer_pipeline_and_text_injection(model):
    from transformers import pipeline
    from transformers.generation.streamers import BaseStreamer

    from memoryllm_hf.tiny import tiny_tokenizer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    tokenizer = tiny_tokenizer()
    model.inject("The sky was green on Tuesday.", tokenizer=tokenizer)
    streamer = Collect()
    ids = tokenizer("The sky is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, streamer=streamer)
    assert torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks[:-1]]), out[0])
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("The sky is", max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"] == tokenizer.decode(out[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@torch.no_grad()
def test_gpu_model_with_the_long_term_memory_on_the_cpu(converted, model):
    gpu = load(converted).to("cuda")
    fill(gpu)
    assert gpu.long_term_memory.slots[0].device.type == "cpu" and gpu.memory.device.type == "cuda"
    prompt = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(8))
    assert (gpu(prompt.cuda()).logits.cpu() - model(prompt).logits).abs().max() < 1e-4
    assert torch.equal(gpu.generate(prompt.cuda(), max_new_tokens=4, do_sample=False).cpu(),
                       model.generate(prompt, max_new_tokens=4, do_sample=False))


@torch.no_grad()
def test_an_emptied_memory_reads_what_it_has(model):
    """After `reset_memory` (no long-term slot: the official code would loop forever) reads use the pool alone, then
    every layer reads as many long-term slots as its fewest candidates allow, up to `read_tokens`."""
    model.reset_memory()
    prompt = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(9))
    assert not model.memory_is_initialized and model.long_term_memory.slot_counts == [0, 0]
    drawer = torch.Generator().manual_seed(3)
    model.inject(torch.randint(3, 256, (6,), generator=drawer), generator=drawer)  # tiles the empty pool
    model(prompt)
    assert [o.shape[1] for o in model.last_retrieval.order] == [0, 0]
    for _ in range(2):
        model.inject(torch.randint(3, 256, (6,), generator=drawer), generator=drawer)
    model(prompt)
    assert [o.shape[1] for o in model.last_retrieval.order] == [8, 8]  # 2 x K = 8 pending slots per layer
    assert torch.isfinite(model(prompt).logits).all()


@torch.no_grad()
def test_cli_conversion_loads_with_remote_code_alone(model, tmp_path):
    """`memoryllm-hf convert --official` on an M+ folder; a process that never imports this package loads the result
    with `trust_remote_code=True` and reads exactly what this process reads (after the same injections)."""
    import os
    import subprocess
    import sys
    import textwrap

    from memoryllm_hf.cli import main

    assert main(["convert", "--official", str(GOLDEN), str(tmp_path / "cli")]) == 0
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(10))
    torch.save({"prompt": prompt, "logits": model(prompt).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "cli")!r}, trust_remote_code=True).eval()
        assert "memoryllm_hf" not in sys.modules, "the package was imported"
        model.config.min_inject_tokens = 1
        expected = load_file({str(GOLDEN / "expected.safetensors")!r})
        drawer = torch.Generator().manual_seed(1234)
        for t in range(1, 5):
            model.inject(expected[f"ctx_ids_{{t}}"], generator=drawer)
        reference = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            diff = (model(reference["prompt"]).logits - reference["logits"]).abs().max().item()
        assert diff < 1e-5, diff
        print("remote code module:", type(model).__module__)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout


@torch.no_grad()
def test_automodel_reads_mplus_without_the_head(converted, model):
    from transformers import AutoModel

    headless = AutoModel.from_pretrained(converted).eval()
    headless.config.min_inject_tokens = 1
    fill(headless)
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(11))
    hidden = model(prompt, output_hidden_states=True).hidden_states[-1]
    assert (headless(prompt).last_hidden_state - hidden).abs().max() < 1e-5


@torch.no_grad()
def test_static_cache_generation_equals_the_dynamic_one(model):
    prompt = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(12))
    dynamic = model.generate(prompt, max_new_tokens=4, do_sample=False)
    static = model.generate(prompt, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)

"""Numerical parity with the official M+ code (`MPlus`): a converted M+ checkpoint replays every recording.

Each golden folder (tests/fixtures/official_mplus_tiny, plus the folders listed in MEMORYLLM_HF_GOLDEN, colon-separated,
laid out the same way) holds an official checkpoint, its inputs and `expected.safetensors`. The timeline: injections
1..T (one drop generator seeded `seeds.drop` for all commits), read A after the injection that merges
(`merge_at_injection`), read B and `generate` after the last. Every recorded tensor must be compared: a tensor the
test does not know fails it. Floats within 1e-5; indices, ages and tokens exactly.
"""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from memoryllm_hf.convert import convert_official
from memoryllm_hf.modeling.mplus_memory import merge_survivors
from memoryllm_hf.modeling.mplus_model import commit_sources, dropped_slots

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-5
GOLDEN = [FIXTURES / "official_mplus_tiny"] + [
    Path(p) for p in os.environ.get("MEMORYLLM_HF_GOLDEN", "").split(":") if p.strip()
]


class Recording:
    """The expected tensors of one folder; every comparison marks its key, `unchecked()` lists the rest."""

    def __init__(self, folder: Path):
        self.tensors = load_file(folder / "expected.safetensors")
        self.used: set[str] = set()
        self.diffs: dict[str, float] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def close(self, key: str, actual: torch.Tensor) -> None:
        expected = self[key]
        assert tuple(actual.shape) == tuple(expected.shape), (key, tuple(actual.shape), tuple(expected.shape))
        diff = (actual.detach().float().cpu() - expected.float()).abs().max().item() if expected.numel() else 0.0
        group = re.sub(r"(_\d+|\.l\d+)", "", key)
        self.diffs[group] = max(self.diffs.get(group, 0.0), diff)
        assert diff <= TOL, f"{key}: max |diff| {diff:.3g} > {TOL}"

    def exact(self, key: str, actual: torch.Tensor) -> None:
        expected = self[key]
        assert torch.equal(actual.detach().cpu().to(expected.dtype), expected), (key, actual, expected)

    def unchecked(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def load_converted(folder: Path, tmp: Path):
    model = AutoModelForCausalLM.from_pretrained(convert_official(folder, tmp)).eval()
    model.config.min_inject_tokens = 1  # the recordings include contexts shorter than K
    return model


def set_pool_ages(model, ages: torch.Tensor) -> None:
    state = model.memory_state()
    state.long_term = dataclasses.replace(state.long_term, pool_ages=ages.long())
    model.load_memory_state(state)


def check_read(model, rec: Recording, name: str) -> None:
    logits = model(input_ids=rec["query_ids"]).logits
    rec.close(f"{name}_logits", logits)
    got = model.last_retrieval
    for layer in range(model.config.num_hidden_layers):
        rec.close(f"{name}_scores.l{layer}", got.scores[layer][0])
        rec.exact(f"{name}_topk", torch.stack([t[0] for t in got.top]))
        rec.exact(f"{name}_order", torch.stack([o[0] for o in got.order]))
        rec.exact(f"{name}_ages", torch.stack([a[0] for a in got.ages]))
    rec.close(f"{name}_queries", torch.stack([q[0] for q in got.queries]))


@torch.no_grad()
def replay(folder: Path, tmp_path: Path) -> Recording:
    """Convert `folder`'s checkpoint, run its timeline, compare every recording it makes (asserting each)."""
    model = load_converted(folder, tmp_path / "converted")
    rec = Recording(folder)
    inputs = json.loads((folder / "inputs.json").read_text())
    cfg = model.config
    L, N, K = cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.num_update_tokens
    set_pool_ages(model, rec["stm_ages_initial"])
    drawer = torch.Generator().manual_seed(inputs["seeds"]["drop"])
    injections = sorted(int(k.split("_")[1]) for k in rec.tensors if re.fullmatch(r"delta_\d+", k))
    read_a_after = inputs["merge_at_injection"]
    for t in injections:
        ids = rec[f"ctx_ids_{t}"]
        rec.close(f"delta_{t}", model.new_memory_slots(ids)[None])
        before = model.memory_state()
        twin = torch.Generator()
        twin.set_state(drawer.get_state())
        sources = commit_sources(before, K, cfg, twin)
        model.inject(ids, generator=drawer)
        rec.close(f"memory_after_{t}", model.memory)
        rec.exact(f"kept_indices_{t}", sources[:, : N - K])
        rec.exact(f"dropped_indices_{t}", dropped_slots(sources, before.num_filled_slots))
        memory = model.long_term_memory
        rec.exact(f"stm_ages_after_{t}", memory.pool_ages)
        if f"ltm_after_{t}.l0" in rec:  # this commit merged
            assert memory.num_pending == 0 and memory.commits == 0
            for layer in range(L):
                old = before.long_term
                kept, _ = merge_survivors(
                    old.recall[layer], old.num_pending + K, cfg.read_tokens, cfg.recall_initial, cfg.recall_decay
                )
                rec.exact(f"ltm_merge_kept_{t}.l{layer}", kept)
                rec.close(f"ltm_after_{t}.l{layer}", memory.slots[layer])
                rec.close(f"ltm_keys_after_{t}.l{layer}", memory.keys[layer])
                rec.exact(f"ltm_ages_after_{t}.l{layer}", memory.ages[layer])
                rec.close(f"ltm_rf_after_{t}.l{layer}", memory.recall[layer])
        else:
            rec.close(f"pending_memories_after_{t}", memory.pending_slots)
            rec.close(f"pending_keys_after_{t}", memory.pending_keys)
            rec.exact(f"pending_ages_after_{t}", memory.pending_ages)
        if t == read_a_after:
            check_read(model, rec, "readA")
    check_read(model, rec, "readB")
    query = rec["query_ids"]
    steps = rec["generate_step_logits"].shape[0]
    out = model.generate(
        query, attention_mask=torch.ones_like(query), max_new_tokens=steps, do_sample=False, num_beams=1,
        output_logits=True, return_dict_in_generate=True,
    )
    rec.exact("generate_sequences", out.sequences)
    rec.close("generate_step_logits", torch.stack(out.logits)[:, 0])
    return rec


@pytest.mark.parametrize("folder", GOLDEN, ids=[p.name for p in GOLDEN])
def test_mplus_replays_every_recording(folder, tmp_path):
    rec = replay(folder, tmp_path)
    print(f"\n{folder.name} max |diff| per group: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(rec.diffs.items())))
    assert not rec.unchecked(), f"recorded tensors the test does not compare: {rec.unchecked()}"


def test_a_recording_the_replay_does_not_compare_fails_it(tmp_path):
    folder = tmp_path / "golden"
    shutil.copytree(FIXTURES / "official_mplus_tiny", folder)
    tensors = load_file(folder / "expected.safetensors")
    tensors["readC_logits"] = torch.zeros(1)
    save_file(tensors, folder / "expected.safetensors")
    assert replay(folder, tmp_path).unchecked() == ["readC_logits"]

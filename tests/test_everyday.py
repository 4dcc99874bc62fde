"""Everyday use without surprises: misspelt settings refused, clear errors for empty input, /undo of /forget,
--threads on the command line, the read mode switched at run time."""

import io
import os
import sys

import pytest
import torch

from memoryllm_hf import cli, load
from memoryllm_hf.modeling import MemoryState


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_memory_token": 512}, "unknown setting 'num_memory_token': did you mean 'num_memory_tokens'?"),
        ({"read_mod": "pool"}, "did you mean 'read_mode'?"),
        ({"revison": "main"}, "did you mean 'revision'?"),
        ({"zzz": None}, "unknown setting 'zzz'"),  # refused even when None (None values are otherwise ignored)
    ],
)
def test_load_refuses_unknown_settings(settings, message):
    with pytest.raises(TypeError, match=message):
        load("tiny", **settings)


def test_from_base_and_the_config_refuse_misspelt_settings(llama_folder):
    from memoryllm_hf.modeling import MemoryLlamaConfig, MemoryLlamaForCausalLM

    with pytest.raises(TypeError, match="from_base\\(\\) got an unknown setting 'num_memory_token': did you mean"):
        MemoryLlamaForCausalLM.from_base(llama_folder[0], num_memory_token=16)
    with pytest.raises(TypeError, match="unknown setting 'retrieval_neighbor': did you mean 'retrieval_neighbors'"):
        MemoryLlamaConfig(retrieval_neighbor=2)
    assert MemoryLlamaConfig(my_note="kept").my_note == "kept"  # a free attribute far from every field: as before
    wrapped = MemoryLlamaForCausalLM.from_base(llama_folder[0], num_memory_tokens=16, num_update_tokens=4, dtype=None)
    assert wrapped.config.num_memory_tokens == 16


def test_load_takes_known_settings():
    model, _ = load("tiny", num_memory_tokens=12, attn_implementation="eager", read_mode=None)
    assert model.config.num_memory_tokens == 12


@pytest.mark.parametrize("ids", [[], (), {"input_ids": []}, torch.empty(0, dtype=torch.long), torch.empty(1, 0)])
def test_inject_of_nothing_says_so(ids):
    model, _ = load("tiny")
    before = model.memory_state().content_hash()
    with pytest.raises(ValueError, match="nothing to inject: no token ids"):
        model.inject(ids)
    assert model.memory_state().content_hash() == before


def test_chat_undo_takes_back_a_forget(capsys, folder, monkeypatch):
    notes = "Alice lives in Paris and works as a baker."
    script = [f"/remember {notes}", "/remember Bob keeps three cats.", "/forget", "/undo", "/undo", "/save"]
    script += ["/forget", "/remember Bob keeps three cats.", "/undo", "/undo", "/undo", "/quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    assert cli.main(["chat", str(folder)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    total = [int(line.split(", ")[1].split()[0]) for line in lines if line.startswith("remembered (")][1]
    assert lines[3] == "memory and conversation cleared (/undo brings them back)"
    assert lines[4].startswith(f"took back the /forget ({total} injections in memory, conversation back)")
    assert lines[5] == "error: the memory was replaced since the last inject; there is nothing to undo"
    assert MemoryState.load(folder / "memory.safetensors").num_injections == total  # /save after the undo
    assert lines[9].startswith("took back the last /remember (0 injections")
    assert lines[10].startswith(f"took back the /forget ({total} injections")
    assert lines[11].startswith("error: ")


def test_threads_option_on_every_command(capsys, folder, monkeypatch):
    threads = torch.get_num_threads()
    try:
        assert cli.main(["stats", str(folder), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit):
            cli.main(["ask", str(folder), "hi", "--threads", "0"])
        assert "must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert all("--threads" in command.format_help() for name, command in commands.items() if name != "demo")


def test_read_mode_switches_at_run_time():
    """`model.config.read_mode` is read at every forward (as the README says): no reload needed."""
    settings = {"memory_update": "input", "fresh_pool": "grow", "long_term_memory_tokens": 200, "read_tokens": 6}
    model, _ = load("tiny", read_mode="retrieve", **settings)
    for _ in range(3):
        model.inject(torch.randint(3, 128, (12,)))
    prompt = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        retrieved = model(prompt).logits
        model.config.read_mode = "pool"
        pooled = model(prompt).logits
        model.config.read_mode = "retrieve"
        again = model(prompt).logits
    assert not torch.allclose(retrieved, pooled) and torch.equal(retrieved, again)


@pytest.mark.parametrize("read_mode", ["pool", "retrieve"])
def test_prefix_plus_prompt_past_the_window_is_warned_about_first(read_mode, monkeypatch):
    from transformers.testing_utils import CaptureLogger

    from memoryllm_hf.modeling import memory_reads

    settings = {"memory_update": "input", "fresh_pool": "grow", "long_term_memory_tokens": 200, "read_tokens": 12}
    model, _ = load("tiny", read_mode=read_mode, **settings)  # max_position_embeddings = 256
    model.inject(torch.randint(3, 128, (64,)))  # 4 updates of 6 slots: the pool (24 slots) is full
    prefix = {"pool": 1 + 24, "retrieve": 1 + 12}[read_mode]  # [bos; pool] or [bos; read_tokens]
    assert model.memory_prefix_length == 25
    reads = []
    monkeypatch.setattr(type(model.reads[read_mode]), "read", lambda *a, **k: reads.append(1) or 1 / 0)
    with CaptureLogger(memory_reads.logger) as log, pytest.raises(ZeroDivisionError):
        model(torch.randint(3, 128, (1, 256 - prefix)))
    assert log.out == ""  # exactly the window: fine
    with CaptureLogger(memory_reads.logger) as log, pytest.raises(ZeroDivisionError):
        model(torch.randint(3, 128, (1, 257 - prefix)))
    assert f"the memory prefix (up to {prefix} positions) plus the prompt ({257 - prefix} tokens) = 257" in log.out
    assert "window of 256" in log.out and len(reads) == 2  # said before the read computed anything


def test_weight_files_have_the_mode_transformers_gives_them(tmp_path, llama_folder):
    """transformers (5.x) writes weights through a private temporary file (mode 0600): a saved MemoryLlama's weights
    have the same mode as a plain Llama's, and its other files the mode the umask gives."""
    from transformers import LlamaForCausalLM

    model, _ = load("tiny")
    model.save_pretrained(tmp_path / "memory_llama")
    LlamaForCausalLM.from_pretrained(llama_folder[0]).save_pretrained(tmp_path / "llama")

    def mode(path):
        return path.stat().st_mode & 0o777

    plain = mode(next((tmp_path / "llama").glob("model*.safetensors")))
    weights = list((tmp_path / "memory_llama").glob("model-*.safetensors"))
    assert weights and all(mode(path) == plain for path in weights)
    umask = os.umask(0)
    os.umask(umask)
    assert mode(tmp_path / "memory_llama" / "memory.safetensors") == 0o666 & ~umask

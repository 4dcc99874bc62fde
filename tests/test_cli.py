"""`memoryllm-hf` command line on tiny folders: help, inject, ask, chat (driven through stdin), stats, demo."""

import argparse
import io
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_folder import save_tiny_folder

from memoryllm_hf import cli
from memoryllm_hf.commands import load_folder
from memoryllm_hf.folder import folder_memory
from memoryllm_hf.greedy import reply
from memoryllm_hf.modeling import MemoryLlamaForCausalLM
from memoryllm_hf.modeling.memory_state import MemoryState

NOTES = "Alice lives in Paris and works as a baker. Bob keeps three cats; the oldest one is called Pepper!"


def memory_bytes(folder: Path) -> str:
    """The folder's memory (pool file and journal), as its content hash."""
    return folder_memory(folder).content_hash()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_on_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ["demo", "convert", "inject", "ask", "chat", "stats"])
    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sorted(set(subparsers.choices) - {"demo"}):  # demo forwards --help to the demo itself
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: memoryllm-hf {name}" in capsys.readouterr().out


def test_demo_forwards_its_arguments(monkeypatch):
    received = []
    monkeypatch.setitem(sys.modules, "memoryllm_hf.demo", types.SimpleNamespace(main=received.append))
    assert cli.main(["demo", "--help", "--max-new-tokens", "5"]) == 0
    assert received == [["--help", "--max-new-tokens", "5"]]


def test_inject_saves_memory_and_reports_replaced_slots(capsys, folder):
    code, out, err = run_cli(capsys, "inject", folder, "--text", NOTES)
    assert code == 0
    assert "Injecting" in err  # progress bar
    updates = int(out.split()[0])
    assert updates >= 2 and "0 of 0 stored slots per layer replaced; 24/24 slots filled" in out
    saved = folder_memory(folder)
    assert saved.num_injections == updates
    reloaded = MemoryLlamaForCausalLM.from_pretrained(folder)
    assert reloaded.memory_state().content_hash() == saved.content_hash()

    code, out, _ = run_cli(capsys, "inject", folder, "--text", "Bob keeps three cats.")
    assert code == 0 and out.startswith("1 memory update") and "6 of 24 stored slots per layer replaced" in out
    assert folder_memory(folder).num_injections == updates + 1


def test_inject_file_and_encodings(capsys, folder, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes("Café crème: Alice lives in Paris.".encode("latin-1"))
    before = memory_bytes(folder)
    code, _, err = run_cli(capsys, "inject", folder, "--file", notes)
    assert code == 1 and "is not utf-8 text (byte 0xe9 at offset 3)" in err and "--encoding" in err
    assert memory_bytes(folder) == before
    assert run_cli(capsys, "inject", folder, "--file", notes, "--encoding", "latin-1")[0] == 0
    assert memory_bytes(folder) != before


@pytest.mark.parametrize("text", ["", "  \n\t  "])
def test_inject_refuses_blank_input(capsys, folder, tmp_path, text):
    notes = tmp_path / "notes.txt"
    notes.write_text(text)
    before = memory_bytes(folder)
    code, _, err = run_cli(capsys, "inject", folder, "--file", notes)
    assert code == 1 and "empty or whitespace only" in err
    assert run_cli(capsys, "inject", folder, "--text", text)[0] == 1
    assert memory_bytes(folder) == before


def test_inject_refuses_a_corrupted_memory_file(capsys, folder):
    memory_file = folder / "memory.safetensors"
    memory_file.write_bytes(memory_file.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "inject", folder, "--text", NOTES)
    assert code == 1 and "truncated or corrupted" in err


def test_commands_refuse_a_folder_that_is_not_memory_llama(capsys, tmp_path):
    code, _, err = run_cli(capsys, "stats", tmp_path)
    assert code == 1 and "no config.json" in err


@pytest.mark.parametrize("chat_template", [True, False])
def test_ask_answers_greedily_with_the_memory(capsys, tmp_path, chat_template):
    folder = save_tiny_folder(tmp_path / "model", chat_template=chat_template)
    assert run_cli(capsys, "inject", folder, "--text", NOTES)[0] == 0
    code, out, _ = run_cli(capsys, "ask", folder, "Where does Alice live?", "--max-new-tokens", "6")
    assert code == 0
    model, tokenizer = load_folder(folder)
    question = "Where does Alice live?"
    if chat_template:
        prompt = tokenizer("user: " + question + "\nassistant: ", return_tensors="pt").input_ids
    else:
        prompt = tokenizer(question, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True).strip()
    assert out == expected + "\n"
    model.reset_memory()
    assert reply(model, tokenizer, [{"role": "user", "content": question}], 6) != expected  # the memory is read


def test_chat_repl_through_stdin(capsys, folder, monkeypatch):
    script = "\n".join(
        [
            "Where does Alice live?",
            "/remember " + NOTES,
            "/remember hi",
            "/snapshot notes",
            "/forget",
            "/stats",
            "/restore notes",
            "/nonsense",
            "/save",
            "/quit",
            "/remember never read",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script + "\n"))
    code, out, _ = run_cli(capsys, "chat", folder)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("memory chat on") and "(0 slots filled)" in lines[0]
    assert any(line.startswith("remembered (") for line in lines)
    assert any("at least min_inject_tokens" in line for line in lines)  # "/remember hi" is too short
    assert "memory and conversation cleared" in out and "injections    0" in out
    assert "restored snapshot 'notes'" in out and "unknown command /nonsense" in out
    snapshot = MemoryState.load(folder / "snapshots" / "notes.safetensors")
    saved = folder_memory(folder)
    assert saved.content_hash() == snapshot.content_hash() and saved.num_injections >= 2
    assert "never read" not in out


def test_chat_warns_about_unsaved_changes_and_autosaves(capsys, folder, monkeypatch):
    before = memory_bytes(folder)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/remember " + NOTES + "\n"))
    code, out, _ = run_cli(capsys, "chat", folder)
    assert code == 0 and "not saved" in out and memory_bytes(folder) == before
    monkeypatch.setattr(sys, "stdin", io.StringIO("/remember " + NOTES + "\n/forget\n/restore missing\n"))
    code, out, _ = run_cli(capsys, "chat", folder, "--autosave")
    assert code == 0 and "not saved" not in out and "no snapshot named 'missing'" in out
    assert folder_memory(folder).num_injections == 0


def test_stats_text_and_png(capsys, folder, tmp_path):
    run_cli(capsys, "inject", folder, "--text", NOTES)
    run_cli(capsys, "inject", folder, "--text", NOTES)  # a second update: slots of two ages
    png = tmp_path / "norms.png"
    code, out, _ = run_cli(capsys, "stats", folder, "--png", png)
    assert code == 0
    assert "2 layers x 24 slots x 32 (float32)" in out and "K=6" in out and "filled        24/24" in out
    assert "slot norm histogram" in out and "slot age histogram" in out and "(48 of 48 slots known)" in out
    histogram = [line for line in out.splitlines() if " | " in line]
    assert len(histogram) == 20 and sum(int(line.split()[-1]) for line in histogram) == 2 * 2 * 24
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a fresh interpreter importing transformers: 10-20 s on a shared CPU
def test_console_script_chat_end_to_end(folder):
    """The installed `memoryllm-hf` script, a real subprocess reading its stdin."""
    script = shutil.which("memoryllm-hf", path=str(Path(sys.executable).parent))
    assert script, "memoryllm-hf console script is not installed (pip install -e .)"
    result = subprocess.run(
        [script, "chat", str(folder), "--max-new-tokens", "3"],
        input=f"/remember {NOTES}\nWho is Pepper?\n/save\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "remembered (" in result.stdout and "memory saved to" in result.stdout
    assert folder_memory(folder).num_injections >= 2


def test_cli_injects_keep_the_long_term_store_and_ask_retrieves(tmp_path, capsys):
    retrieving = save_tiny_folder(
        tmp_path / "retrieve", memory_update="input", fresh_pool="grow", long_term_memory_tokens=600,
        read_mode="retrieve",
    )
    for text in (NOTES, "The meeting moved to Thursday at 10 am."):
        assert run_cli(capsys, "inject", retrieving, "--text", text)[0] == 0
    model, tokenizer = load_folder(retrieving)
    assert [b.call for b in model.long_term_memory][-1] == model.num_injections
    assert len({b.call for b in model.long_term_memory}) == 2  # two inject calls, each kept with its updates
    code, out, _ = run_cli(capsys, "ask", retrieving, "Where does Alice live?", "--max-new-tokens", "3")
    assert code == 0
    ids = tokenizer("Where does Alice live?", return_tensors="pt")["input_ids"]
    assert model.retrieve(ids)[0]  # something stored is read back


def test_cli_read_mode_override(folder, capsys):
    code, out, err = run_cli(capsys, "ask", folder, "Where does Alice live?", "--read-mode", "retrieve")
    assert code != 0 and "long_term_memory_tokens" in out + err  # a pool-only folder cannot retrieve: said clearly
    assert run_cli(capsys, "ask", folder, "Where does Alice live?", "--read-mode", "pool", "--max-new-tokens", "2")[0] == 0

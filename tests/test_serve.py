"""`memoryllm-hf serve`: a real HTTP client (urllib) against the server, the CLI routed through it (same results as
in-process), concurrent clients (no lost update), and a kill of the server process mid-inject (nothing lost)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tiny_folder import save_tiny_folder

from memoryllm_hf import cli, load
from memoryllm_hf.client import read_server_file, running_server, server_file
from memoryllm_hf.commands import load_folder
from memoryllm_hf.folder import folder_memory
from memoryllm_hf.greedy import reply
from memoryllm_hf.modeling import MemoryState
from memoryllm_hf.serve import MemoryServer
from memoryllm_hf.service import FolderService

NOTES = "Alice lives in Paris and works as a baker. Bob keeps three cats; the oldest one is called Pepper!"
MORE = ["The meeting moved to Thursday at 10 am.", "Bring the blue folder.", "Who is Pepper?", "Bob keeps cats."]
RETRIEVING = {
    "memory_update": "input",
    "fresh_pool": "grow",
    "long_term_memory_tokens": 600,
    "read_mode": "retrieve",
    "read_tokens": 12,
}


@pytest.fixture(scope="module")
def retrieving_template(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("serve") / "model", **RETRIEVING)


def copy(template: Path, target: Path) -> Path:
    return Path(shutil.copytree(template, target))


class ThreadServer:
    """A `MemoryServer` serving from a thread of this process (the subprocess test below runs the real command)."""

    def __init__(self, folder: Path):
        self.server = MemoryServer(folder, log=lambda _: None)
        self.url = self.server.start()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@pytest.fixture
def served(retrieving_template, tmp_path, one_thread):
    """(folder, server) of a tiny retrieving folder with one injection, served from a thread."""
    folder = copy(retrieving_template, tmp_path / "served")
    assert cli.main(["inject", str(folder), "--text", NOTES]) == 0
    server = ThreadServer(folder)
    yield folder, server
    server.stop()


def http(url: str, method: str, path: str, body=None, token: str | None = None) -> tuple[int, dict]:
    """One request with the standard library's HTTP client: (status, JSON reply)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_http_endpoints(served):
    folder, server = served
    token = server.server.token
    info = read_server_file(folder)
    assert info["state"] == "ready" and info["pid"] == os.getpid() and info["port"] == server.server.port
    assert oct(server_file(folder).stat().st_mode & 0o777) == "0o600"  # it holds the token

    status, health = http(server.url, "GET", "/health")
    assert status == 200 and health["folder"] == os.path.realpath(folder) and health["num_injections"] >= 1
    status, reply_ = http(server.url, "POST", "/ask", {"question": "Where does Alice live?"})
    assert status == 401 and "Bearer" in reply_["error"]["message"]

    model, tokenizer = load(folder)  # the same folder, loaded here (not load_folder: the server holds the lock)
    expected = reply(model, tokenizer, [{"role": "user", "content": "Where does Alice live?"}], 6)
    question = {"question": "Where does Alice live?", "max_new_tokens": 6}
    status, answer = http(server.url, "POST", "/ask", question, token)
    assert status == 200 and answer == {"answer": expected}

    messages = [{"role": "user", "content": "Who is Pepper?"}]
    status, completion = http(
        server.url, "POST", "/v1/chat/completions", {"model": folder.name, "messages": messages, "max_tokens": 5}, token
    )
    assert status == 200 and completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": reply(model, tokenizer, messages, 5)}
    assert http(server.url, "GET", "/v1/models", token=token)[1]["data"][0]["id"] == folder.name

    before = folder_memory(folder)
    status, result = http(server.url, "POST", "/inject", {"text": MORE[0]}, token)
    assert status == 200 and result["num_injections"] == before.num_injections + result["updates"]
    saved = folder_memory(folder)  # on disk before the reply came
    assert saved.content_hash() == result["content_hash"] != before.content_hash()
    lines = http(server.url, "POST", "/stats", {}, token)[1]["lines"]  # the journal, beside the store
    assert any(line.startswith("journal       2 records (injections 1-") for line in lines)

    assert http(server.url, "POST", "/snapshot", {"name": "one"}, token)[0] == 200
    assert (folder / "snapshots" / "one.safetensors").is_file()
    assert http(server.url, "POST", "/undo", {}, token)[1] == {"num_injections": before.num_injections}
    assert folder_memory(folder).content_hash() == before.content_hash()
    assert http(server.url, "POST", "/restore", {"name": "one"}, token)[0] == 200
    assert folder_memory(folder).content_hash() == saved.content_hash()
    status, stats = http(server.url, "POST", "/stats", {}, token)
    assert status == 200 and f"injections    {saved.num_injections}" in stats["lines"]
    assert any(line.startswith("journal       empty") for line in stats["lines"])  # /restore saved in full
    assert any(line.startswith("previous      the memory before the last full save") for line in stats["lines"])

    # refusals say what to send instead, and change nothing
    refusals = [
        ("POST", "/ask", {"questoin": "x"}, 400, "did you mean 'question'?"),
        ("POST", "/ask", {"question": "x", "read_mode": "both"}, 422, "read_mode must be one of"),
        ("POST", "/ask", {"question": "x", "max_new_tokens": 0}, 400, "max_new_tokens must be >= 1"),
        ("POST", "/inject", {"text": "  "}, 422, "empty or whitespace only"),
        ("POST", "/inject", {"file": "notes.txt"}, 400, "absolute path"),
        ("POST", "/inject", {"text": "hi"}, 422, "min_inject_tokens"),
        ("POST", "/restore", {"name": "missing"}, 422, "no snapshot named 'missing'"),
        ("POST", "/v1/chat/completions", {"messages": messages, "stream": True}, 400, "stream"),
        ("POST", "/v1/chat/completions", {"messages": messages, "temperature": 0.7}, 400, "greedy"),
        ("POST", "/v1/chat/completions", {"messages": "hello"}, 400, "messages must be"),
        ("POST", "/forget", {}, 404, "no endpoint POST /forget"),
    ]
    for method, path, body, code, message in refusals:
        status, refused = http(server.url, method, path, body, token)
        assert (status, message in refused["error"]["message"]) == (code, True), (path, body, refused)
    assert folder_memory(folder).content_hash() == saved.content_hash()


def test_cli_through_the_server_equals_in_process(served, tmp_path, capsys):
    folder, server = served
    alone = copy(folder, tmp_path / "alone")  # same memory, no server
    notes = tmp_path / "notes.txt"
    notes.write_text(MORE[1])

    def both(*argv) -> tuple[str, str]:
        outputs = []
        for target in (folder, alone):
            code, out, err = run_cli(capsys, *[target if a == "FOLDER" else a for a in argv], "--threads", "1")
            assert code == 0, err
            outputs.append(out.replace(str(target), "FOLDER"))
        return outputs[0], outputs[1]

    injections = server.server.service.model.num_injections
    served_out, alone_out = both("inject", "FOLDER", "--text", MORE[0])
    assert served_out == alone_out and "memory saved to FOLDER" in served_out
    assert server.server.service.model.num_injections > injections  # it went through the server
    served_out, alone_out = both("inject", "FOLDER", "--file", notes)
    assert served_out == alone_out
    saved, saved_alone = (folder_memory(f) for f in (folder, alone))
    assert saved.content_hash() == saved_alone.content_hash() and len(saved.long_term) == len(saved_alone.long_term)
    served_out, alone_out = both("ask", "FOLDER", "Who is Pepper?", "--max-new-tokens", "12")
    assert served_out == alone_out
    served_pool, alone_pool = both("ask", "FOLDER", "Who is Pepper?", "--max-new-tokens", "12", "--read-mode", "pool")
    assert served_pool == alone_pool != served_out  # (the two read modes answer differently here)
    assert server.server.service.model.config.read_mode == "retrieve"  # a question's override does not stick
    served_out, alone_out = both("stats", "FOLDER")
    assert served_out == alone_out and "injections" in served_out

    code, _, err = run_cli(capsys, "chat", folder)
    assert code == 1 and "held by `memoryllm-hf serve`" in err
    code, _, err = run_cli(capsys, "inject", folder, "--text", "hi")
    assert code == 1 and "min_inject_tokens" in err  # the server's refusal, printed like an in-process one


def test_concurrent_clients_lose_no_update(served):
    folder, server = served
    token, start = server.server.token, folder_memory(folder).num_injections
    results, errors = [], []

    def client(number: int) -> None:
        for text in MORE[number % 2 :: 2]:
            status, result = http(server.url, "POST", "/inject", {"text": f"{number}: {text}"}, token)
            (results if status == 200 else errors).append(result)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == 8
    totals = sorted(r["num_injections"] for r in results)
    assert len(set(totals)) == 8  # every inject saw the one before it
    saved = folder_memory(folder)
    assert saved.num_injections == start + sum(r["updates"] for r in results) == totals[-1]
    assert saved.content_hash() == next(r["content_hash"] for r in results if r["num_injections"] == totals[-1])


def spawn_server(folder: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "memoryllm_hf.cli", "serve", str(folder), "--threads", "1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_served(folder: Path, process: subprocess.Popen):
    deadline = time.monotonic() + 300
    while (server := running_server(folder)) is None:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return server


def staging_entries(folder: Path) -> list[str]:
    return [e for e in os.listdir(folder.parent) if e.startswith(f".{folder.name}.tmp-")]


def file_version(path: Path) -> tuple:
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns


def quietly(request) -> None:
    try:
        request()
    except OSError:  # the server was killed: no answer
        pass


def test_kill_during_an_inject_loses_nothing(tmp_path, capsys):
    """SIGKILL the `serve` process while it saves an inject: the folder holds the old or the new memory and loads,
    and the next command removes the killed server's file and runs in-process."""
    # A pool of 50k slots makes each save write ~13 MB, so the kill can land inside it.
    folder = save_tiny_folder(tmp_path / "model", num_memory_tokens=50_000, inject_chunk_size=16)
    text = " ".join([NOTES] * 3)  # several updates
    old = folder_memory(folder)
    expected = copy(folder, tmp_path / "expected")
    model, tokenizer = load_folder(expected)
    new_hash = FolderService(expected, model, tokenizer).inject(text)["content_hash"]
    process = spawn_server(folder)
    try:
        server = wait_until_served(folder, process)
        version = file_version(folder / "memory.safetensors")
        post = lambda: http(server.url, "POST", "/inject", {"text": text}, server.token)  # noqa: E731
        request = threading.Thread(target=quietly, args=(post,), daemon=True)
        request.start()
        deadline = time.monotonic() + 120

        def saving() -> bool:  # a folder being staged, the memory file or a journal record being written
            journal = folder / "memory_journal"
            return bool(staging_entries(folder)) or file_version(folder / "memory.safetensors") != version or (
                journal.is_dir() and bool(os.listdir(journal))
            )

        while not saving() and time.monotonic() < deadline:
            time.sleep(0.002)
        assert saving(), "the save was not seen"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    request.join(timeout=60)
    saved = folder_memory(folder)  # fully checked: a torn file is refused
    assert saved.content_hash() in (old.content_hash(), new_hash)
    assert server_file(folder).exists()  # left behind by the kill
    code, out, err = run_cli(capsys, "inject", folder, "--text", NOTES)
    assert code == 0 and "removed the file of a stopped server" in err and not server_file(folder).exists()
    assert not staging_entries(folder)  # the next save cleaned up what the kill left


def test_the_server_warms_up_before_the_first_question(retrieving_template, tmp_path, one_thread, monkeypatch):
    """What the first read of a process computes once per store (every block's retrieval features, packed) is done
    before the server says it is ready: its first question computes none."""
    from memoryllm_hf.modeling import memory_retrieval

    folder = copy(retrieving_template, tmp_path / "warm")
    assert cli.main(["inject", str(folder), "--text", NOTES]) == 0
    computed = []
    real = memory_retrieval.block_features  # (the "model" scorer's features; the template scores with it)
    monkeypatch.setattr(memory_retrieval, "block_features", lambda *a, **k: computed.append(1) or real(*a, **k))
    server = ThreadServer(folder)
    try:
        assert computed, "the warm-up read computed the stored blocks' features"
        computed.clear()
        token = server.server.token
        question = {"question": "Where does Alice live?", "max_new_tokens": 2}
        assert http(server.url, "POST", "/ask", question, token)[0] == 200
        assert computed == []
    finally:
        server.stop()

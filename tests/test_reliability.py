"""Memory is user data: crash-safe folder saves (killed writers, full disks), folder locks, one validated memory
file format on every load path, consistent snapshots under the memory lock, and a chat that survives Ctrl-C."""

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.std import TqdmDefaultWriteLock, tqdm

from memoryllm_hf import MemoryLlamaForCausalLM, cli
from memoryllm_hf.chat import ChatSession
from memoryllm_hf.commands import load_folder
from memoryllm_hf.folder import folder_memory
from memoryllm_hf.modeling import atomic_io as memory_storage
from memoryllm_hf.modeling.atomic_io import iter_orphans
from memoryllm_hf.modeling.memory_journal import read_folder_memory
from memoryllm_hf.modeling.memory_state import MemoryChangedOnDiskError, MemoryState, MemoryStateError
from memoryllm_hf.tiny import tiny_model

SHORT = "Bob keeps three cats."  # one memory update of the tiny folder


def injections_on_disk(folder: Path) -> int:
    return read_folder_memory(folder, MemoryState).num_injections  # the pool file and its journal


def no_orphans(folder: Path) -> bool:
    return not list(iter_orphans(str(folder)))


# ---------------------------------------------------------------- killed savers
def _marker(model) -> torch.Tensor:
    return model.model.layers[0].mlp.down_proj.weight[0, 0]


def _save_loop(folder: str, log: str) -> None:
    """Child: load the folder, then inject, change a weight and save_pretrained over the folder, forever."""
    torch.set_num_threads(1)
    model = MemoryLlamaForCausalLM.from_pretrained(folder)
    with open(log, "a") as handle:
        handle.write("ready\n")
    while True:
        model.inject(torch.randint(3, 128, (12,)))  # one memory update
        with torch.no_grad():
            _marker(model).fill_(float(model.num_injections))  # weights and memory change together
        model.save_pretrained(folder)
        with open(log, "a") as handle:
            handle.write(f"done {model.num_injections}\n")


def _cli_loop(folder: str, log: str) -> None:
    """Child: `memoryllm-hf inject` on the folder, again and again."""
    torch.set_num_threads(1)
    with open(log, "a") as handle:
        handle.write("ready\n")
    while True:
        assert cli.main(["inject", folder, "--text", SHORT]) == 0
        with open(log, "a") as handle:
            handle.write(f"done {injections_on_disk(Path(folder))}\n")


def _fork(target, *args) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            sys.stdout = sys.stderr = open(os.devnull, "w")
            # tqdm's lock is shared with the parent (a process-shared semaphore): a child killed while holding it
            # would block the parent's next progress bar. Children get their own.
            TqdmDefaultWriteLock.mp_lock, TqdmDefaultWriteLock.th_lock = multiprocessing.RLock(), threading.RLock()
            fresh, classes = TqdmDefaultWriteLock(), [tqdm]
            while classes:
                cls = classes.pop()
                classes += cls.__subclasses__()
                cls._lock = fresh
            target(*args)
        finally:
            os._exit(0)
    return pid


def _exec(target, *args) -> int:
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_reliability as t; t.{target.__name__}(*sys.argv[1:])"
    process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process.pid


def _last_done(log: Path) -> int | None:
    done = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("done")]
    return done[-1] if done else None


def kill_savers(folder: Path, tmp_path: Path, loop, start, kills: int, max_delay: float, check) -> int:
    """Start `loop` as a subprocess `kills` times and SIGKILL it at a random moment; after each kill the folder
    must load, be consistent (`check`), and hold the last completed save or the one that was being written."""
    rng = random.Random(0)
    interrupted = 0
    expected = injections_on_disk(folder)
    for attempt in range(kills):
        log = tmp_path / f"log-{attempt}"
        log.write_text("")
        pid = start(loop, str(folder), str(log))
        deadline = time.time() + 120
        while "ready" not in log.read_text():
            assert time.time() < deadline, "the saver did not start"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done = _last_done(log)
        on_disk = check(folder)
        previous = expected if done is None else done
        assert on_disk >= previous, f"kill {attempt}: a completed save was lost ({on_disk} < {previous})"
        assert on_disk - previous in (0, 1), f"kill {attempt}: {on_disk} updates on disk, {previous} saved"
        interrupted += not no_orphans(folder)
        expected = on_disk
    return interrupted


def _check_saved_model(folder: Path) -> int:
    model = MemoryLlamaForCausalLM.from_pretrained(folder)  # validates the memory fully
    assert float(_marker(model).detach()) == model.num_injections, "weights and memory of different saves"
    return model.num_injections


def _check_cli_folder(folder: Path) -> int:
    model, _ = load_folder(folder)
    return model.num_injections


def _prepare_save_folder(tmp_path: Path) -> Path:
    model = tiny_model()
    model.inject(torch.randint(3, 128, (12,)))
    with torch.no_grad():
        _marker(model).fill_(float(model.num_injections))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_killed_save_pretrained_leaves_a_loadable_folder(tmp_path):
    folder = _prepare_save_folder(tmp_path)
    kill_savers(folder, tmp_path, _save_loop, _fork, kills=20, max_delay=0.5, check=_check_saved_model)
    MemoryLlamaForCausalLM.from_pretrained(folder).save_pretrained(folder)  # the next save cleans up
    assert no_orphans(folder)
    assert sorted(os.listdir(tmp_path)) == sorted([".ckpt.lock", "ckpt"] + [f"log-{i}" for i in range(20)])


def test_killed_cli_inject_leaves_a_loadable_folder(folder, tmp_path):
    kill_savers(folder, tmp_path, _cli_loop, _fork, kills=20, max_delay=0.8, check=_check_cli_folder)
    assert cli.main(["inject", str(folder), "--text", SHORT]) == 0
    assert no_orphans(folder), f"left behind: {list(iter_orphans(str(folder)))}"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["save_pretrained", "cli"])
def test_killed_fresh_processes_leave_a_loadable_folder(template, tmp_path, which):
    """The same with fresh interpreters (no fork), killed at random points, 25 times each."""
    if which == "cli":
        folder = Path(shutil.copytree(template, tmp_path / "model"))
        kill_savers(folder, tmp_path, _cli_loop, _exec, kills=25, max_delay=3.0, check=_check_cli_folder)
    else:
        folder = _prepare_save_folder(tmp_path)
        kill_savers(folder, tmp_path, _save_loop, _exec, kills=25, max_delay=1.5, check=_check_saved_model)


def test_full_disk_during_save_pretrained_keeps_the_old_folder(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC) while the weights, then the memory, are written: nothing changes."""
    model = tiny_model()
    model.inject(torch.randint(3, 128, (12,)))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    model.inject(torch.randint(3, 128, (12,)))

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(28, "No space left on device")

    import transformers.modeling_utils as modeling_utils

    for module, name in ((modeling_utils, "safe_save_file"), (memory_storage, "save_file")):
        with monkeypatch.context() as patch:
            patch.setattr(module, name, disk_full)
            with pytest.raises(OSError, match="No space left"):
                model.save_pretrained(folder)
        assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
        assert no_orphans(folder) and sorted(os.listdir(tmp_path)) == [".ckpt.lock", "ckpt"]
    assert MemoryLlamaForCausalLM.from_pretrained(folder).num_injections == 1


def test_failed_memory_write_keeps_the_folder_memory(folder, monkeypatch):
    """The CLI's memory writer fails half-way: the folder keeps its memory (catches a non-atomic writer)."""
    assert cli.main(["inject", str(folder), "--text", SHORT]) == 0
    before = (folder / "memory.safetensors").read_bytes()

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memory_storage, "save_file", half_written)
    assert cli.main(["inject", str(folder), "--text", SHORT]) == 1
    assert (folder / "memory.safetensors").read_bytes() == before and no_orphans(folder)
    monkeypatch.undo()
    assert injections_on_disk(folder) == 1


def test_saving_over_a_single_file_checkpoint_keeps_other_files(tmp_path):
    """A plain transformers folder (model.safetensors, user files, a subfolder) saved over: the model files are
    replaced, everything else survives; the stale model.safetensors does not (it would win over the index)."""
    folder = tmp_path / "ckpt"
    model = tiny_model()
    super(MemoryLlamaForCausalLM, model).save_pretrained(folder)  # the layout of plain transformers
    (folder / "notes.txt").write_text("mine")
    (folder / "adapters").mkdir()
    (folder / "adapters" / "x.safetensors").write_bytes(b"adapter")
    model.inject(torch.randint(3, 128, (12,)))
    model.save_pretrained(folder)
    assert not (folder / "model.safetensors").exists()
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "adapters" / "x.safetensors").read_bytes() == b"adapter"
    assert MemoryLlamaForCausalLM.from_pretrained(folder).num_injections == 1


# ---------------------------------------------------------------- locks and concurrent writers
CLI_TWICE = """
import sys
from memoryllm_hf import cli
for _ in range(int(sys.argv[2])):
    assert cli.main(["inject", sys.argv[1], "--text", sys.argv[3]]) == 0
"""


def test_two_cli_processes_lose_no_update(folder):
    rounds = 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([sys.executable, "-c", CLI_TWICE, str(folder), str(rounds), SHORT], env=env)
        for _ in range(2)
    ]
    for process in processes:
        assert process.wait(timeout=600) == 0
    assert injections_on_disk(folder) == 2 * rounds


def test_chat_autosave_refuses_to_overwrite_a_memory_saved_elsewhere(folder, capsys):
    model, tokenizer = load_folder(folder)
    session = ChatSession(str(folder), model, tokenizer, autosave=True)
    assert cli.main(["inject", str(folder), "--text", SHORT]) == 0  # another process changes the folder
    theirs = folder_memory(folder).content_hash()
    session.handle("/remember " + SHORT)
    out = capsys.readouterr().out
    assert "not saved" in out and "changed since it was loaded" in out
    assert folder_memory(folder).content_hash() == theirs and model.num_injections == 1
    session.handle("/save force")
    assert "memory saved" in capsys.readouterr().out
    assert folder_memory(folder).content_hash() == model.memory_state().content_hash()


def test_save_pretrained_refuses_to_overwrite_a_memory_saved_elsewhere(folder):
    model = MemoryLlamaForCausalLM.from_pretrained(folder)
    model.inject(torch.randint(3, 128, (12,)))
    assert cli.main(["inject", str(folder), "--text", SHORT]) == 0
    theirs = folder_memory(folder).content_hash()
    with pytest.raises(MemoryChangedOnDiskError, match="changed since it was loaded"):
        model.save_pretrained(folder)
    assert folder_memory(folder).content_hash() == theirs
    model.save_pretrained(folder, overwrite_memory=True)
    model.inject(torch.randint(3, 128, (12,)))
    model.save_pretrained(folder)  # its own last save is what it loaded now: no refusal
    assert injections_on_disk(folder) == 2


# ---------------------------------------------------------------- non-finite slots
def test_inject_refuses_non_finite_slots_and_names_the_layer(output_model):
    output_model.inject(torch.randint(3, 128, (12,)))
    before = output_model.memory_state()
    with torch.no_grad():
        output_model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(MemoryStateError, match="layer 1 hold NaN/inf"):
        output_model.inject(torch.randint(3, 128, (40,)), chunk_size=20)  # the 2nd chunk would be committed too
    assert output_model.memory_state().content_hash() == before.content_hash()
    slots = torch.zeros(2, 6, 32)
    slots[0, 2, 3] = float("inf")
    with pytest.raises(MemoryStateError, match="layer 0"):
        output_model.commit_memory_slots(slots)
    assert output_model.memory_state().content_hash() == before.content_hash()


# ---------------------------------------------------------------- one format, validated on every load path
def _rewrite_memory(folder: Path, tensors: dict | None = None, metadata: dict | None = None, **changes) -> None:
    path = folder / "memory.safetensors"
    with safe_open(path, "pt") as handle:
        old_metadata = handle.metadata()
    tensors = load_file(path) if tensors is None else tensors
    tensors.update(changes)
    save_file(tensors, path, metadata=old_metadata if metadata is None else metadata)


@pytest.fixture
def saved(tmp_path) -> Path:
    model = tiny_model()
    model.inject(torch.randint(3, 128, (12,)))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _memory_without(folder: Path, name: str) -> dict:
    tensors = load_file(folder / "memory.safetensors")
    del tensors[name]
    return tensors


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        (lambda f: _rewrite_memory(f, memory=torch.full((2, 24, 32), float("nan"))), "NaN/inf"),
        (lambda f: _rewrite_memory(f, metadata={"format": "pt"}, memory=torch.full((2, 24, 32), float("inf"))), "NaN"),
        (lambda f: _rewrite_memory(f, _memory_without(f, "memory")), "missing"),
        (lambda f: _rewrite_memory(f, _memory_without(f, "memory_filled")), "missing"),
        (lambda f: _rewrite_memory(f, _memory_without(f, "memory"), {"format": "pt"}), "missing"),
        (lambda f: _rewrite_memory(f, extra=torch.zeros(2)), "not part of a memory"),
        (lambda f: _rewrite_memory(f, memory_injections=torch.tensor(5)), "disagree"),
        (lambda f: _rewrite_memory(f, memory_filled=torch.tensor(12)), "written_at disagrees|disagree"),
        (lambda f: _rewrite_memory(f, memory=load_file(f / "memory.safetensors")["memory"] * 2), "hash"),
    ],
)
def test_from_pretrained_refuses_broken_memory_files(saved, breakage, match):
    breakage(saved)
    with pytest.raises(MemoryStateError, match=match):
        MemoryLlamaForCausalLM.from_pretrained(saved)
    from transformers import AutoModelForCausalLM

    with pytest.raises(MemoryStateError, match=match):
        AutoModelForCausalLM.from_pretrained(saved)


def test_from_pretrained_refuses_another_models_memory_unless_allowed(saved, tmp_path):
    other = tiny_model(seed=1)
    other.inject(torch.randint(3, 128, (12,)))
    other.memory_state().save(tmp_path / "other.safetensors")
    shutil.copy(tmp_path / "other.safetensors", saved / "memory.safetensors")
    with pytest.raises(MemoryStateError, match="another model"):
        MemoryLlamaForCausalLM.from_pretrained(saved)
    loaded = MemoryLlamaForCausalLM.from_pretrained(saved, allow_other_model=True)
    assert loaded.memory_state().content_hash() == other.memory_state().content_hash()


def test_memory_file_metadata_is_the_one_schema(saved):
    with safe_open(saved / "memory.safetensors", "pt") as handle:
        metadata = handle.metadata()
    model = MemoryLlamaForCausalLM.from_pretrained(saved)
    state = model.memory_state()
    assert metadata == {"format": "pt", **state.metadata()}
    assert json.loads(metadata["tensors"])["memory"] == {"dtype": "float32", "shape": [2, 24, 32]}
    assert metadata["fingerprint"] == model.memory_fingerprint() and metadata["num_update_tokens"] == "6"


def test_fingerprint_survives_a_dtype_cast(saved):
    loaded = MemoryLlamaForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    assert loaded.memory.dtype == torch.bfloat16
    assert loaded.memory_fingerprint() == MemoryLlamaForCausalLM.from_pretrained(saved).memory_fingerprint()


def test_base_checkpoint_without_memory_starts_empty(tmp_path):
    model = tiny_model()
    model.inject(torch.randint(3, 128, (12,)))
    state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith("memory")}
    super(MemoryLlamaForCausalLM, model).save_pretrained(tmp_path, state_dict=state_dict)
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.num_filled_slots == 0 and loaded.num_injections == 0 and not loaded.memory.any()


# ---------------------------------------------------------------- one consistent snapshot under the memory lock
def _consistent(buffers: dict) -> bool:
    written, filled, injections = buffers["memory_written_at"], int(buffers["memory_filled"]), int(
        buffers["memory_injections"]
    )
    empty = written.shape[1] - filled
    return (
        filled == min(written.shape[1], 6 * injections)
        and int(written.max()) == injections
        and not bool(written[:, :empty].any())
        and not bool(buffers["memory"][:, :empty].any())
    )


def test_state_dict_and_save_are_one_snapshot_while_another_thread_injects(input_model, tmp_path, one_thread):
    model = input_model
    stop = threading.Event()

    def injector():
        while not stop.is_set():
            model.inject(torch.randint(3, 128, (6,)))
            if model.num_filled_slots == 24:
                model.reset_memory()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=injector)
    model.inject(torch.randint(3, 128, (6,)))
    thread.start()
    try:
        torn = 0
        for step in range(3000):
            torn += not _consistent({k: v for k, v in model.state_dict().items() if k.startswith("memory")})
            if step % 500 == 0:
                model.save_pretrained(tmp_path / "ckpt")
                MemoryState.load(tmp_path / "ckpt" / "memory.safetensors")  # validate() checks the counters
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert torn == 0


# ---------------------------------------------------------------- the chat survives Ctrl-C and failed saves
def test_chat_survives_ctrl_c_and_failed_saves(folder, capsys, monkeypatch):
    model, tokenizer = load_folder(folder)
    session = ChatSession(str(folder), model, tokenizer)
    session.handle("/remember " + SHORT)
    remembered = model.memory_state().content_hash()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("memoryllm_hf.chat.reply", interrupted)
    assert session.handle("Where does Bob live?") and "cancelled" in capsys.readouterr().out
    assert session.history == []
    monkeypatch.setattr(model, "new_memory_slots", interrupted)
    assert session.handle("/remember " + SHORT) and "cancelled" in capsys.readouterr().out
    assert model.memory_state().content_hash() == remembered
    monkeypatch.undo()

    from safetensors import SafetensorError

    def broken(*args, **kwargs):
        raise SafetensorError("disk on fire")

    monkeypatch.setattr("memoryllm_hf.chat.save_memory", broken)
    assert session.handle("/save")
    assert "not saved" in capsys.readouterr().out and model.memory_state().content_hash() == remembered
    lines = iter(["/snapshot keep"])

    def read_line(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(MemoryState, "save", broken)
    session.run(read_line)
    out = capsys.readouterr().out
    assert "keep" not in model.snapshots, "a snapshot whose save failed must not be registered"
    assert "were not saved" in out
    monkeypatch.undo()
    interrupts = iter([KeyboardInterrupt, "/quit"])

    def read_interrupted(prompt):
        item = next(interrupts)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    session.run(read_interrupted)
    assert "Ctrl-C" in capsys.readouterr().out


# ---------------------------------------------------------------- small hostile inputs (point 9)
def test_small_hostile_inputs(folder, tmp_path, capsys, output_model):
    with pytest.raises(ValueError, match="chunk_size must be >= min_inject_tokens"):
        output_model.inject(torch.randint(3, 128, (12,)), chunk_size=0)
    from memoryllm_hf.tiny import TINY  # noqa: F401  (the tiny tokenizer is the folder's)

    model, tokenizer = load_folder(folder)
    with pytest.raises(ValueError, match="empty or whitespace"):
        model.inject("\u200b\u200b\u2060 \ufeff", tokenizer=tokenizer)
    assert cli.main(["inject", str(folder), "--text", "\u200b\u200b"]) == 1
    assert cli.main(["inject", str(folder), "--file", "/dev/zero"]) == 1
    assert "larger than" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text(SHORT)
    assert cli.main(["inject", str(folder), "--file", str(tmp_path / "t.txt"), "--encoding", "bogus"]) == 1
    assert "unknown encoding" in capsys.readouterr().err
    assert cli.main(["inject", str(folder), "--text", SHORT]) == 0
    capsys.readouterr()
    assert cli.main(["stats", str(folder), "--png", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert cli.main(["stats", str(folder), "--png", str(tmp_path / "norms")]) == 0
    assert str(tmp_path / "norms.png") in capsys.readouterr().out and (tmp_path / "norms.png").is_file()
    (folder / "config.json").write_text("[1, 2]")
    assert cli.main(["stats", str(folder)]) == 1
    assert "JSON object" in capsys.readouterr().err


def test_in_place_pool_edit_changes_the_answer(output_model):
    """The memory keys/values cache keys on the pool's version: an in-place edit must not return stale logits."""
    output_model.inject(torch.randint(3, 128, (12,)))
    prompt = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        before = output_model(prompt).logits
        output_model.memory.mul_(2)
        after = output_model(prompt).logits
    assert not torch.allclose(before, after)

"""Hub workflows with the real huggingface_hub / transformers client against the local Hub server over HTTP."""

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RevisionNotFoundError
from safetensors import safe_open
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from memoryllm_hf import hub as hub_cli
from memoryllm_hf.hub import hub_endpoint
from memoryllm_hf.testing import LocalHub
from memoryllm_hf.tiny import tiny_model

REPO = "tester/memory-model"
MEMORY_FILES = {"memory.safetensors", "memory_state.json"}
TOKEN = "local-test-token"
EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running local Hub that this process's Hub client talks to (fresh download cache, test token)."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub() as server, hub_endpoint(server.url, cache_dir=tmp_path / "hf-cache", token=TOKEN):
        yield server


def model_with_memory(injections: int = 1, seed: int = 0, **overrides):
    model = tiny_model(seed=seed, memory_update="input", fresh_pool="grow", **overrides)
    for i in range(injections):
        model.inject(torch.arange(3 + 10 * i, 13 + 10 * i))
    return model


def assert_same_memory(model, state) -> None:
    for name, tensor in state.as_buffers().items():
        assert torch.equal(getattr(model, name), tensor), name
        assert getattr(model, name).dtype == tensor.dtype, name


def tree(revision: str) -> dict[str, str]:
    """path -> blob id of a revision, as listed by the Hub API."""
    return {f.path: f.blob_id for f in HfApi().list_repo_tree(REPO, revision=revision, recursive=True)}


def test_memory_only_push_is_one_commit_changing_only_the_memory(hub):
    model = model_with_memory()
    model.push_to_hub(REPO)
    before = tree("main")
    commits_before = len(HfApi().list_repo_commits(REPO))
    model.inject(torch.arange(40, 52))

    commit = model.push_memory_to_hub(REPO)

    after = tree(commit.oid)
    assert len(HfApi().list_repo_commits(REPO)) == commits_before + 1
    assert set(after) == set(before)
    assert {path for path in after if after[path] != before[path]} == MEMORY_FILES
    assert [p for p in after if p.endswith(".safetensors") and after[p] != before[p]] == ["memory.safetensors"]
    # The bytes travelled: what the server stored is what the metadata describes and what a download returns.
    stored = hub.files(REPO)
    metadata = json.loads(stored["memory_state.json"])
    assert hashlib.sha256(stored["memory.safetensors"]).hexdigest() == metadata["sha256"]
    assert ("POST", f"/api/models/{REPO}/commit/main") in hub.requests
    assert metadata["injections"] == 2 and metadata["fingerprint"] == model.memory_fingerprint()
    assert metadata["num_memory_tokens"] == 24 and metadata["num_update_tokens"] == 6
    assert metadata["filled_slots"] == 12 and metadata["dtype"] == "float32" and metadata["package_version"]


def test_revisions_give_back_each_memory_bit_identical(hub):
    model = model_with_memory()
    first = model.push_to_hub(REPO).oid
    state_a = model.memory_state()
    model.inject(torch.arange(40, 52))
    model.push_memory_to_hub(REPO, revision="customer-b", create_branch=True)
    state_b = model.memory_state()
    model.inject(torch.arange(60, 72))
    model.push_memory_to_hub(REPO)
    state_c = model.memory_state()

    assert {b.name for b in HfApi().list_repo_refs(REPO).branches} == {"main", "customer-b"}
    assert_same_memory(AutoModelForCausalLM.from_pretrained(REPO, revision=first), state_a)
    assert_same_memory(AutoModelForCausalLM.from_pretrained(REPO, revision="customer-b"), state_b)
    reloaded = AutoModelForCausalLM.from_pretrained(REPO)
    assert_same_memory(reloaded, state_c)
    branch_head = HfApi().repo_info(REPO, revision="customer-b").sha
    assert ("GET", f"/{REPO}/resolve/{branch_head}/memory.safetensors") in hub.requests

    metadata = reloaded.load_memory_from_hub(REPO, revision="customer-b")
    assert_same_memory(reloaded, state_b)
    assert metadata["injections"] == 2
    # The drop generator came back too: the next injection drops the same slots on both models.
    model.load_memory_state(state_b)
    for m in (model, reloaded):
        for i in range(3):
            m.inject(torch.arange(80 + i, 92 + i))
    assert_same_memory(reloaded, model.memory_state())


@pytest.mark.parametrize(
    "other, error",
    [
        (lambda: model_with_memory(num_memory_tokens=12), "shape"),
        (lambda: model_with_memory(seed=1), "fingerprint"),
    ],
    ids=["pool-shape", "other-base-model"],
)
def test_load_refuses_memory_of_another_model(hub, other, error):
    model_with_memory(injections=2).push_to_hub(REPO)
    target = other()
    before = target.memory_state()
    with pytest.raises(ValueError, match=error):
        target.load_memory_from_hub(REPO)
    assert_same_memory(target, before)


def upload_memory(revision: str, memory_bytes: bytes, state_json: dict | None) -> None:
    """Commit memory files to `revision` (a new branch) with the raw client, as a broken uploader would."""
    api = HfApi()
    api.create_branch(REPO, branch=revision)
    operations = [CommitOperationAdd("memory.safetensors", memory_bytes)]
    if state_json is not None:
        operations.append(CommitOperationAdd("memory_state.json", json.dumps(state_json).encode()))
    api.create_commit(REPO, operations=operations, commit_message="broken memory", revision=revision)


def test_push_and_load_refuse_broken_memories(hub):
    model = model_with_memory()
    model.push_to_hub(REPO)
    nan_state = model.memory_state()
    nan_state.memory[0, -1, 0] = float("nan")
    model.swap_memory_state(nan_state)
    with pytest.raises(ValueError, match="NaN"):
        model.push_memory_to_hub(REPO)

    tensors = {k: v.contiguous() for k, v in nan_state.as_buffers().items()}
    nan_bytes = save(tensors)
    upload_memory("nan", nan_bytes, {"sha256": hashlib.sha256(nan_bytes).hexdigest()})
    other_bytes = save({**tensors, "memory": torch.zeros_like(nan_state.memory)})
    upload_memory("stale-json", other_bytes, None)  # keeps main's memory_state.json

    target = model_with_memory()
    before = target.memory_state()
    with pytest.raises(ValueError, match="NaN"):
        target.load_memory_from_hub(REPO, revision="nan")
    with pytest.raises(ValueError, match="does not match the sha256"):
        target.load_memory_from_hub(REPO, revision="stale-json")
    assert_same_memory(target, before)


def test_memory_push_refuses_a_repo_without_this_model(hub):
    model_with_memory().push_to_hub(REPO)
    commits = len(HfApi().list_repo_commits(REPO))
    with pytest.raises(ValueError, match="different model"):
        model_with_memory(seed=1).push_memory_to_hub(REPO)
    HfApi().create_repo("tester/plain")
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="tester/plain")
    with pytest.raises(ValueError, match="push the whole model once"):
        model_with_memory().push_memory_to_hub("tester/plain")
    assert len(HfApi().list_repo_commits(REPO)) == commits
    assert {f.path for f in HfApi().list_repo_tree("tester/plain")} == {".gitattributes", "config.json"}


def test_push_to_hub_writes_a_model_card(hub):
    model = model_with_memory(injections=3)
    model.push_to_hub(REPO, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", tags=["demo"])
    card = ModelCard.load(REPO)
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"memoryllm", "demo"} <= set(card.data.tags)
    assert card.data.memory == {
        "slots_per_layer": 24,
        "layers": 2,
        "update_tokens": 6,
        "update_rule": "input",
        "injections": 3,
    }
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}"' in card.text
    assert ("POST", "/api/validate-yaml") in hub.requests


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def run_cli(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    hub_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    assert args.func(args) == 0


def test_cli_pushes_a_folder_then_only_its_memory(hub, tmp_path):
    model, tokenizer = model_with_memory(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "day1")
    tokenizer.save_pretrained(tmp_path / "day1")
    run_cli("push", str(tmp_path / "day1"), REPO, "--endpoint", hub.url)
    assert {"tokenizer.json", "README.md", "memory_state.json"} <= set(tree("main"))

    model.inject(tokenizer("w5 w6 w7 w8 w9 w10 w11", add_special_tokens=False)["input_ids"])
    model.save_pretrained(tmp_path / "day2")
    run_cli("push", str(tmp_path / "day2"), REPO, "--revision", "day2", "--memory-only", "--endpoint", hub.url)
    main, day2 = tree("main"), tree("day2")
    assert {path for path in day2 if day2[path] != main.get(path)} == MEMORY_FILES
    assert_same_memory(AutoModelForCausalLM.from_pretrained(REPO, revision="day2"), model.memory_state())


def test_local_hub_keeps_old_revisions_and_answers_like_the_hub(hub):
    api = HfApi()
    api.create_repo("tester/files")
    first = api.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id="tester/files").oid
    api.upload_file(path_or_fileobj=b"two", path_in_repo="a.txt", repo_id="tester/files")
    assert hub.files("tester/files", first)["a.txt"] == b"one"
    assert hub.files("tester/files")["a.txt"] == b"two"
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="b.txt", repo_id="tester/files", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        api.hf_hub_download("tester/files", "missing.txt")
    with pytest.raises(HfHubHTTPError, match="412"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="b.txt", repo_id="tester/files", parent_commit=first)
    unchanged = api.upload_file(path_or_fileobj=b"two", path_in_repo="a.txt", repo_id="tester/files")
    assert len(api.list_repo_commits("tester/files")) == 3 and unchanged.oid == api.repo_info("tester/files").sha


@pytest.mark.slow  # a second Python process importing torch + transformers: ~10-25 s
def test_remote_code_loads_a_memory_by_revision_in_a_fresh_process(hub, tmp_path):
    """A process that never imports memoryllm_hf: remote code from the repo, memory by branch and by sha."""
    model = model_with_memory()
    model.push_to_hub(REPO)
    model.inject(torch.arange(40, 52))
    sha = model.push_memory_to_hub(REPO, revision="v2", create_branch=True).oid
    expected = tmp_path / "expected.pt"
    torch.save(model.memory_state().as_buffers(), expected)
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(expected)!r})
        model = AutoModelForCausalLM.from_pretrained({REPO!r}, revision="v2", trust_remote_code=True)
        assert "memoryllm_hf" not in sys.modules, "the package was imported"
        assert all(torch.equal(getattr(model, k), v) for k, v in expected.items()), "memory differs (branch)"
        model.reset_memory()
        model.load_memory_from_hub({REPO!r}, revision={sha!r})
        assert all(torch.equal(getattr(model, k), v) for k, v in expected.items()), "memory differs (sha)"
        print("remote code module:", type(model).__module__)
        """
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout


def test_push_memory_example_runs_against_a_local_hub(capsys):
    spec = importlib.util.spec_from_file_location("push_memory", EXAMPLES / "push_memory.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--local"]) == 0
    out = capsys.readouterr().out
    assert out.count("bit-identical: True") == 4 and "False" not in out
    assert "files changed ['memory.safetensors', 'memory_state.json']" in out


# ---------------------------------------------------------------- pushes that must not lose or add files
def test_push_twice_keeps_files_it_did_not_write(hub):
    api = HfApi()
    model = model_with_memory()
    model.push_to_hub(REPO)  # creates the repo
    api.upload_file(path_or_fileobj=b"adapter", path_in_repo="adapters/x.safetensors", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"mine", path_in_repo="extra.safetensors", repo_id=REPO)
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # the local Hub answers 409 like the real one
    model.inject(torch.arange(40, 52))
    model.push_to_hub(REPO, max_shard_size="20KB")  # a second push with another shard layout
    files = hub.files(REPO)
    assert files["adapters/x.safetensors"] == b"adapter" and files["extra.safetensors"] == b"mine"
    index = json.loads(files["model.safetensors.index.json"])["weight_map"]
    shards = {name for name in files if name.startswith("model-")}
    assert shards == set(index.values()) - {"memory.safetensors"} and len(shards) > 1  # old shard removed
    model.push_to_hub(REPO)  # and back to one shard: the sharded files go, nothing else does
    files = hub.files(REPO)
    assert {name for name in files if name.startswith("model-")} == {"model-00001-of-00001.safetensors"}
    assert files["adapters/x.safetensors"] == b"adapter" and files["extra.safetensors"] == b"mine"
    assert_same_memory(AutoModelForCausalLM.from_pretrained(REPO), model.memory_state())


def test_memory_only_push_uploads_only_the_memory_files(hub, monkeypatch):
    model = model_with_memory()
    model.push_to_hub(REPO)
    sent = []
    real = HfApi.create_commit

    def recording(self, repo_id, operations, *args, **kwargs):
        sent.extend(op.path_in_repo for op in operations)
        return real(self, repo_id, operations, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", recording)
    model.push_memory_to_hub(REPO)  # nothing changed: identical re-uploads are still visible here
    assert sorted(sent) == sorted(MEMORY_FILES)


def test_memory_push_fails_when_the_branch_moved_meanwhile(hub, monkeypatch):
    """push_memory_to_hub commits on top of the revision it checked (parent_commit): a concurrent push fails."""
    model = model_with_memory()
    model.push_to_hub(REPO)
    model.inject(torch.arange(40, 52))
    real = HfApi.create_commit

    def someone_else_first(self, repo_id, operations, *args, **kwargs):
        real(self, repo_id, [CommitOperationAdd("notes.txt", b"concurrent")], commit_message="other writer")
        return real(self, repo_id, operations, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", someone_else_first)
    with pytest.raises(HfHubHTTPError, match="412"):
        model.push_memory_to_hub(REPO)
    assert hub.files(REPO)["notes.txt"] == b"concurrent"


@pytest.mark.parametrize("content", [b"[1, 2]", b"null", b"{not json"])
def test_load_refuses_a_memory_state_json_that_is_not_an_object(hub, content):
    model = model_with_memory()
    model.push_to_hub(REPO)
    HfApi().upload_file(path_or_fileobj=content, path_in_repo="memory_state.json", repo_id=REPO)
    before = model.memory_state().content_hash()
    with pytest.raises(ValueError, match="memory_state.json"):
        model.load_memory_from_hub(REPO)
    assert model.memory_state().content_hash() == before


def test_load_checks_the_content_hash_of_memory_state_json(hub):
    model = model_with_memory()
    model.push_to_hub(REPO)
    metadata = json.loads(hub.files(REPO)["memory_state.json"])
    metadata.pop("sha256")
    metadata["content_hash"] = "0" * 64
    HfApi().upload_file(path_or_fileobj=json.dumps(metadata).encode(), path_in_repo="memory_state.json", repo_id=REPO)
    with pytest.raises(ValueError, match="content_hash"):
        model.load_memory_from_hub(REPO)


def test_from_pretrained_by_revision_refuses_a_broken_memory(hub):
    model = model_with_memory()
    model.push_to_hub(REPO)
    state = model.memory_state()
    state.memory[0, -1, 0] = float("nan")
    tensors = {k: v.contiguous() for k, v in state.as_buffers().items()}
    HfApi().create_branch(REPO, branch="broken")
    HfApi().upload_file(
        path_or_fileobj=save(tensors, metadata={"format": "pt", **model.memory_state().metadata()}),
        path_in_repo="memory.safetensors",
        repo_id=REPO,
        revision="broken",
    )
    with pytest.raises(ValueError, match="NaN/inf"):
        AutoModelForCausalLM.from_pretrained(REPO, revision="broken")
    assert_same_memory(AutoModelForCausalLM.from_pretrained(REPO, revision="main"), model.memory_state())


def _store(model):
    return [(b.injection, b.call, b.slots) for b in model.long_term_memory]


def assert_same_store(a, b) -> None:
    assert [(i, c) for i, c, _ in _store(a)] == [(i, c) for i, c, _ in _store(b)]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(_store(a), _store(b), strict=True))


def test_long_term_store_travels_with_pushes_and_revisions(hub):
    """The long-term store is its own file beside memory.safetensors: whole-model pushes, memory-only pushes,
    revisions and loads by revision bring it back bit for bit; a memory without a store removes the old file."""
    store = {"long_term_memory_tokens": 600, "read_mode": "retrieve"}
    model = model_with_memory(injections=3, **store)
    first = model.push_to_hub(REPO).oid
    assert "long_term_memory.safetensors" in tree("main")
    reloaded = AutoModelForCausalLM.from_pretrained(REPO)
    assert_same_store(reloaded, model)
    a = model.memory_state()
    model.inject(torch.arange(40, 52))
    model.push_memory_to_hub(REPO, revision="b", create_branch=True)
    assert_same_store(AutoModelForCausalLM.from_pretrained(REPO, revision="b"), model)
    reloaded.load_memory_from_hub(REPO, revision="b")
    assert_same_store(reloaded, model)
    reloaded.load_memory_from_hub(REPO, revision=first)
    assert [b.injection for b in reloaded.long_term_memory] == [b.injection for b in a.long_term]
    model.reset_memory()
    model.inject(torch.arange(3, 13))
    model.config.long_term_memory_tokens = 0  # a memory without a store from here on
    model.config.read_mode = "pool"
    model.load_memory_state(type(a)(a.memory, a.filled, a.injections, a.rng_state, a.written_at))
    model.push_memory_to_hub(REPO, revision="b")
    assert "long_term_memory.safetensors" not in tree("b")
    assert AutoModelForCausalLM.from_pretrained(REPO, revision="b", read_mode="pool").long_term_memory == ()


# ---------------------------------------------------------------- one commit per push; pool files of the filled slots
def test_a_full_push_is_one_commit_holding_everything(hub):
    api = HfApi()
    model, tokenizer = model_with_memory(injections=2), tiny_tokenizer()
    model.push_to_hub(REPO, tokenizer=tokenizer)
    commits = api.list_repo_commits(REPO)
    assert len(commits) == 2  # the repo's creation, then the push
    files = set(tree("main"))
    expected = {"config.json", "model.safetensors.index.json", "memory.safetensors", "memory_state.json",
                "README.md", "tokenizer.json", "modeling_memory_llama.py"}
    assert expected <= files and files - {".gitattributes"} == set(hub.files(REPO, commits[0].commit_id)) - {
        ".gitattributes"}
    model.inject(torch.arange(40, 52))
    model.push_to_hub(REPO, tokenizer=tokenizer)  # again, into the existing repo: one more commit
    model.push_to_hub(REPO, revision="other")  # and to a new branch: one commit on it
    assert len(api.list_repo_commits(REPO)) == 3 and len(api.list_repo_commits(REPO, revision="other")) == 4


def filling_model_with_memory(injections: int = 2):
    """A model whose pool fills up from zeros (as from_base leaves it): its pool file holds the filled slots."""
    model = tiny_model(memory_update="input", fresh_pool="grow")
    model.reset_memory()
    for i in range(injections):
        model.inject(torch.arange(3 + 10 * i, 13 + 10 * i))
    return model


def test_pool_files_of_the_filled_slots_travel_through_the_hub_bit_for_bit(hub):
    model = filling_model_with_memory()
    model.push_to_hub(REPO)
    with safe_open(hf_hub_path("memory.safetensors"), "pt") as handle:
        stored = handle.get_slice("memory").get_shape()[1]
    assert stored == model.num_filled_slots < model.config.num_memory_tokens
    assert_same_memory(AutoModelForCausalLM.from_pretrained(REPO), model.memory_state())
    model.inject(torch.arange(60, 70))
    model.push_memory_to_hub(REPO, revision="later", create_branch=True)
    assert_same_memory(AutoModelForCausalLM.from_pretrained(REPO, revision="later"), model.memory_state())
    fresh = filling_model_with_memory(injections=0)
    fresh.load_memory_from_hub(REPO, revision="later")
    assert_same_memory(fresh, model.memory_state())


def hf_hub_path(name: str, revision: str | None = None) -> str:
    return HfApi().hf_hub_download(REPO, name, revision=revision)


def test_a_memory_push_into_an_older_layout_also_uploads_the_index(hub, monkeypatch):
    """Older pushes listed the pool's tensors in the index: a memory push there sends the new index with the memory
    (transformers would otherwise read the smaller pool file as the whole pool)."""
    from memoryllm_hf.modeling.memory_fields import MEMORY_BUFFERS

    model = filling_model_with_memory()
    model.push_to_hub(REPO)
    index = json.loads(hub.files(REPO)["model.safetensors.index.json"])
    index["metadata"].pop("memory_file")
    index["weight_map"].update(dict.fromkeys(MEMORY_BUFFERS, "memory.safetensors"))
    HfApi().upload_file(path_or_fileobj=json.dumps(index).encode(), path_in_repo="model.safetensors.index.json",
                        repo_id=REPO)
    model.inject(torch.arange(60, 70))
    sent = []
    real = HfApi.create_commit

    def recording(self, repo_id, operations, *args, **kwargs):
        sent.extend(op.path_in_repo for op in operations)
        return real(self, repo_id, operations, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", recording)
    model.push_memory_to_hub(REPO)
    assert sorted(sent) == sorted({*MEMORY_FILES, "model.safetensors.index.json"})
    assert_same_memory(AutoModelForCausalLM.from_pretrained(REPO), model.memory_state())
    sent.clear()
    model.push_memory_to_hub(REPO)  # the index is right now: only the memory again
    assert sorted(sent) == sorted(MEMORY_FILES)

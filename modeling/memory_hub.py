"""Hub API of MemoryLlama: push only the memory as one small commit, load a memory state by revision.

A repo holds the weights once and the memory in its own files (the Hub layout of `memory_files`: `memory.safetensors`,
named in `model.safetensors.index.json`, the long-term store, `memory_state.json`). A memory update commits only
these files, so branches or commits of one repo can hold many memories of the same model.
"""

import glob
import importlib.metadata
import json
import os
import tempfile

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    hf_hub_download,
)
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import PreTrainedTokenizerBase

from .memory_fields import MEMORY_BUFFERS, MemoryStateError
from .memory_files import (
    INDEX_FILE,
    INDEX_POOL_KEY,
    MEMORY_FILE,
    MEMORY_STATE_FILE,
    SEGMENTS_DIR,
    WEIGHTS_FILE,
    hub_file_names,
    pool_index,
    read_hub_files,
    read_json_object,
    write_hub_files,
    write_index,
)
from .memory_state import MemoryState
from .memory_store import LongTermStoreError

PACKAGE = "memoryllm-hf"


def package_version() -> str | None:
    """Installed memoryllm-hf version (None when the model runs as remote code without the package)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _download(repo_id: str, filename: str, revision: str | None, token, cache_dir) -> str | None:
    """Path of one repo file at `revision`, or None when the revision has no such file."""
    try:
        return hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir)
    except RemoteEntryNotFoundError:
        return None


class MemoryHubMixin:
    """Memory push/pull for MemoryLlama (through the model's public memory API; the files are the Hub layout of
    `memory_files`)."""

    # ------------------------------------------------------------------ metadata and card
    def model_card(self, repo_id: str, base_model: str | None = None, tags: list[str] | None = None) -> ModelCard:
        """A README.md model card: YAML metadata (library, base model, memory size, injections) and how to load."""
        cfg = self.config
        memory = {
            "slots_per_layer": cfg.num_memory_tokens,
            "layers": cfg.num_hidden_layers,
            "update_tokens": cfg.num_update_tokens,
            "update_rule": cfg.memory_update,
            "injections": self.num_injections,
        }
        data = ModelCardData(
            library_name="transformers",
            base_model=base_model,
            pipeline_tag="text-generation",
            tags=["memoryllm", "memory_llama", "custom_code", *(tags or [])],
            memory=memory,
        )
        body = f"""
# {repo_id.split("/")[-1]}

A MemoryLlama model: a Llama decoder with a MemoryLLM latent memory pool (Wang et al., ICML 2024).

- memory slots per layer (N): {cfg.num_memory_tokens}, layers: {cfg.num_hidden_layers}, hidden size: {cfg.hidden_size}
- slots written per injection (K): {cfg.num_update_tokens}, update rule: "{cfg.memory_update}"
- injections so far: {self.num_injections}, filled slots: {self.num_filled_slots} (when this card was written;
  `{MEMORY_STATE_FILE}` describes the current memory)

The memory is stored in `{MEMORY_FILE}` and updated alone, as one small commit, by `push_memory_to_hub`, so
branches and commits of this repo can hold different memories of the same model.

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="main", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", revision="main", trust_remote_code=True)

model.inject("Text to remember.", tokenizer=tokenizer)
model.push_memory_to_hub("{repo_id}", revision="my-memory", create_branch=True)
model.load_memory_from_hub("{repo_id}", revision="my-memory")   # or from_pretrained(..., revision="my-memory")
```
"""
        return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")

    # ------------------------------------------------------------------ push
    def write_memory_files(self, folder: str) -> dict:
        """Write a snapshot of the memory as the Hub file set into `folder` (refusing a broken memory); returns the
        content of its `memory_state.json`."""
        state = self.memory_state()
        versions = {"memory_update": self.config.memory_update, "package_version": package_version()}
        return write_hub_files(folder, state, versions)

    def push_memory_to_hub(
        self,
        repo_id: str,
        revision: str | None = None,
        commit_message: str | None = None,
        create_branch: bool = False,
        token: str | bool | None = None,
    ) -> CommitInfo:
        """Upload only the memory (`memory.safetensors`, the long-term store and `memory_state.json`) to `revision` as
        one commit.

        The repo must already hold this model with its memory in its own shard (push it once with `push_to_hub`).
        `create_branch=True` creates the branch `revision` from main if it does not exist. The commit is made on
        top of the revision that was checked, so a concurrent push to the same branch fails instead of being lost.
        """
        api = HfApi(token=token)
        if create_branch and revision is None:
            raise ValueError("create_branch=True needs revision=<branch name>")
        try:
            if create_branch:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            head = api.repo_info(repo_id, revision=revision).sha
        except RepositoryNotFoundError:
            raise ValueError(
                f"{repo_id} does not exist on the Hub (or this token cannot see it): push the whole model once with "
                "model.push_to_hub(repo_id), then push memories"
            ) from None
        remote, index = check_remote_layout(repo_id, head, token, self.memory_fingerprint)
        with tempfile.TemporaryDirectory() as folder:
            metadata = self.write_memory_files(folder)
            added, absent = hub_file_names(metadata)
            if index is not None:  # (an older layout: its index listed the pool's tensors)
                write_index(os.path.join(folder, INDEX_FILE), index)
                added.append(INDEX_FILE)
            # a disk-backed store: segments the revision already holds are not uploaded again, others removed
            ours, theirs = metadata.get("segments") or {}, remote.get("segments") or {}
            theirs = theirs if isinstance(theirs, dict) else {}
            held = {
                f"{SEGMENTS_DIR}/{name}" for name, entry in ours.items()
                if isinstance(theirs.get(name), dict) and theirs[name].get("content_hash") == entry["content_hash"]
            }
            # (a held segment keeps its remote bytes: its sha256 in memory_state.json must be the remote file's)
            for name in held:
                ours[name.split("/", 1)[1]] = theirs[name.split("/", 1)[1]]
            if held:
                with open(os.path.join(folder, MEMORY_STATE_FILE), "w") as handle:
                    json.dump(metadata, handle, indent=2)
            added = [name for name in added if name not in held]
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in added
            ]
            operations += [CommitOperationDelete(f"{SEGMENTS_DIR}/{name}") for name in sorted(set(theirs) - set(ours))]
            for name in absent:  # a file of the old memory that this one does not have
                if api.file_exists(repo_id, name, revision=head):
                    operations.append(CommitOperationDelete(path_in_repo=name))
            message = commit_message or f"Update memory ({metadata['injections']} injections)"
            return api.create_commit(
                repo_id, operations=operations, commit_message=message, revision=revision, parent_commit=head
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        base_model: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> CommitInfo:
        """Upload the whole model (weights, memory shard, `memory_state.json`, remote code, a README.md model card
        and, if given, the tokenizer) as one commit. Weight files of an earlier push that this one no longer writes
        (those its index listed, and a single `model.safetensors`) are removed; nothing else in the repo is."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        stale = pushed_weight_files(api, repo_id, revision)
        with tempfile.TemporaryDirectory() as scratch:
            folder = os.path.join(scratch, "model")
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            self.write_memory_files(folder)  # one consistent snapshot of the memory, with its metadata
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            self.model_card(repo_id, base_model, tags).save(os.path.join(folder, "README.md"))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload MemoryLlama",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
                delete_patterns=sorted(stale - set(os.listdir(folder))) or None,
            )

    # ------------------------------------------------------------------ load
    def load_memory_from_hub(
        self,
        repo_id: str,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        allow_other_model: bool = False,
    ) -> dict:
        """Install the memory saved at `repo_id`@`revision` (branch, tag or commit sha); returns its metadata
        (the content of `memory_state.json`, empty when the repo has none).

        Refuses (MemoryStateError, a ValueError; memory untouched) a memory of another shape, K or model
        fingerprint, a broken one (NaN/inf, truncated), or one whose file does not match `memory_state.json`.
        """
        where = f"{repo_id}@{revision or 'main'}"
        try:
            state, metadata = read_hub_files(
                lambda name: _download(repo_id, name, revision, token, cache_dir), MemoryState, where
            )
            self.load_memory_state(state, allow_other_model)
        except (MemoryStateError, LongTermStoreError) as err:
            raise MemoryStateError(f"{where}: {err}") from None
        return metadata


def check_remote_layout(repo_id: str, revision: str, token, fingerprint) -> tuple[dict, dict | None]:
    """Refuse a memory-only push into a repo whose index does not read the memory file, or of another model (one
    whose memory fingerprint differs from `fingerprint()`, the pushing model's, computed only when compared);
    returns (the revision's `memory_state.json` content, {} when it has none; the index the push must upload with
    the memory, None when the revision's is right: an older index lists the pool's tensors, see `pool_index`)."""
    index_path = _download(repo_id, INDEX_FILE, revision, token, None)
    index = {}
    if index_path is not None:
        index = read_json_object(index_path, f"{repo_id}@{revision} {INDEX_FILE}")
    weight_map, named = index.get("weight_map", {}), (index.get("metadata") or {}).get(INDEX_POOL_KEY) == MEMORY_FILE
    upload = None if named else pool_index(index)
    if not named and any(weight_map.get(name) != MEMORY_FILE for name in MEMORY_BUFFERS):
        raise ValueError(
            f"{repo_id}@{revision} does not keep the memory in its own {MEMORY_FILE} (per {INDEX_FILE}); "
            "push the whole model once with model.push_to_hub(repo_id), then push memories"
        )
    state_path = _download(repo_id, MEMORY_STATE_FILE, revision, token, None)
    if state_path is None:
        return {}, upload
    content = read_json_object(state_path, f"{repo_id}@{revision} {MEMORY_STATE_FILE}")
    remote = content.get("fingerprint")
    if remote is not None and remote != fingerprint():
        raise ValueError(
            f"{repo_id}@{revision} holds a different model (memory fingerprint {remote}, this model "
            f"{fingerprint()}); push this model to its own repo with push_to_hub"
        )
    return content, upload


def pushed_weight_files(api: HfApi, repo_id: str, revision: str | None) -> set[str]:
    """Top-level weight files a model push wrote to `revision` before (per its index; a single weights file)."""
    try:
        present = set(api.list_repo_files(repo_id, revision=revision))
    except RevisionNotFoundError:
        return set()
    owned = {WEIGHTS_FILE, INDEX_FILE}
    if INDEX_FILE in present:
        path = _download(repo_id, INDEX_FILE, revision, api.token, None)
        owned |= set(read_json_object(path, f"{repo_id} {INDEX_FILE}").get("weight_map", {}).values())
    return {name for name in owned & present if "/" not in name and glob.escape(name) == name}

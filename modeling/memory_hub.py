"""Hub API of MemoryLlama: push only the memory as one small commit, load a memory state by revision.

A repo holds the weights once and the memory in its own shard, `memory.safetensors` (listed in
`model.safetensors.index.json`), described by `memory_state.json`. A memory update commits only these two files,
so branches or commits of one repo can hold many memories of the same model.
"""

import dataclasses
import glob
import hashlib
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
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from .memory_state import MEMORY_BUFFERS, MemoryState, MemoryStateError
from .memory_storage import INDEX_FILE, MEMORY_FILE, WEIGHTS_FILE
from .memory_store import LONG_TERM_FILE, LongTermStoreError, load_store, save_store
from .mplus_memory import MPlusMemory, MPlusMemoryError, load_mplus_memory, save_mplus_memory

MEMORY_STATE_FILE = "memory_state.json"
PACKAGE = "memoryllm-hf"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _read_json_object(path: str, what: str) -> dict:
    """A JSON file that must hold an object (a list, null or broken JSON is refused with a clear error)."""
    try:
        with open(path) as handle:
            content = json.load(handle)
    except ValueError as err:
        raise MemoryStateError(f"{what} is not valid JSON ({err})") from None
    if not isinstance(content, dict):
        raise MemoryStateError(f"{what} must hold a JSON object, got {type(content).__name__}")
    return content


_HUB_LOAD_ARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "subfolder")


def checkpoint_memory_file(source, load_kwargs: dict) -> tuple[str | None, set[str] | None, str | None]:
    """What `from_pretrained(source, **load_kwargs)` just read about the memory: (the file holding the `memory`
    tensor, the memory buffers the checkpoint lists (None: unknown, e.g. a .bin checkpoint), the local folder)."""
    if source is None:
        return None, None, None
    source, subfolder = os.fspath(source), load_kwargs.get("subfolder") or ""
    folder = os.path.join(source, subfolder) if os.path.isdir(os.path.join(source, subfolder)) else None

    def fetch(name: str) -> str | None:
        if folder is not None:
            return os.path.join(folder, name) if os.path.isfile(os.path.join(folder, name)) else None
        from transformers.utils import cached_file

        hub = {key: load_kwargs[key] for key in _HUB_LOAD_ARGS if key in load_kwargs}
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False, **hub)

    index = fetch(INDEX_FILE)
    if index is not None:
        weight_map = _read_json_object(index, INDEX_FILE).get("weight_map", {})
        keys, name = {key for key in MEMORY_BUFFERS if key in weight_map}, weight_map.get("memory")
    else:
        name = WEIGHTS_FILE
        path = fetch(name)
        if path is None:
            return None, None, folder
        with safe_open(path, "pt") as handle:
            keys = set(handle.keys()) & set(MEMORY_BUFFERS)
    return (fetch(name) if name is not None and "memory" in keys else None), keys, folder


class MemoryHubMixin:
    """Memory push/pull for MemoryLlama (relies on the model's `_current_state` / `_set_state`)."""

    # ------------------------------------------------------------------ metadata and card
    def memory_metadata(self, state: MemoryState, memory_file: str) -> dict:
        """`memory_state.json` content for `state` (taken from this model), saved in `memory_file`: the memory
        file's own metadata (`MemoryState.describe`, same field names) plus the file's sha256 and the versions."""
        return {
            **state.describe(),
            "memory_update": self.config.memory_update,
            "sha256": sha256_file(memory_file),
            "package_version": package_version(),
        }

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
    def _write_memory(self, folder: str) -> dict:
        """Write a snapshot of the memory to `memory.safetensors` (refusing a broken memory), its long-term store
        (if any) to `long_term_memory.safetensors` and its `memory_state.json` into `folder`; returns the metadata."""
        state = self.memory_state()
        path = os.path.join(folder, MEMORY_FILE)
        dataclasses.replace(state, long_term=()).save(path)
        metadata = self.memory_metadata(state, path)
        if state.long_term:
            store_path = os.path.join(folder, LONG_TERM_FILE)
            save = save_mplus_memory if isinstance(state.long_term, MPlusMemory) else save_store
            save(store_path, state.long_term, state.fingerprint)
            metadata["long_term_sha256"] = sha256_file(store_path)
        with open(os.path.join(folder, MEMORY_STATE_FILE), "w") as handle:
            json.dump(metadata, handle, indent=2)
        return metadata

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
        self._check_remote_layout(repo_id, head, token)
        with tempfile.TemporaryDirectory() as folder:
            metadata = self._write_memory(folder)
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                for name in (MEMORY_FILE, LONG_TERM_FILE, MEMORY_STATE_FILE)
                if os.path.exists(os.path.join(folder, name))
            ]
            if "long_term_sha256" not in metadata and api.file_exists(repo_id, LONG_TERM_FILE, revision=head):
                operations.append(CommitOperationDelete(path_in_repo=LONG_TERM_FILE))  # it belongs to the old memory
            message = commit_message or f"Update memory ({metadata['injections']} injections)"
            return api.create_commit(
                repo_id, operations=operations, commit_message=message, revision=revision, parent_commit=head
            )

    def _check_remote_layout(self, repo_id: str, revision: str, token) -> None:
        """Refuse a memory-only push into a repo whose index does not read the memory shard, or of another model."""
        index_path = _download(repo_id, INDEX_FILE, revision, token, None)
        weight_map = {}
        if index_path is not None:
            weight_map = _read_json_object(index_path, f"{repo_id}@{revision} {INDEX_FILE}").get("weight_map", {})
        if any(weight_map.get(name) != MEMORY_FILE for name in MEMORY_BUFFERS):
            raise ValueError(
                f"{repo_id}@{revision} does not keep the memory in its own {MEMORY_FILE} (per {INDEX_FILE}); "
                "push the whole model once with model.push_to_hub(repo_id), then push memories"
            )
        state_path = _download(repo_id, MEMORY_STATE_FILE, revision, token, None)
        if state_path is not None:
            remote = _read_json_object(state_path, f"{repo_id}@{revision} {MEMORY_STATE_FILE}").get("fingerprint")
            if remote is not None and remote != self.memory_fingerprint():
                raise ValueError(
                    f"{repo_id}@{revision} holds a different model (memory fingerprint {remote}, this model "
                    f"{self.memory_fingerprint()}); push this model to its own repo with push_to_hub"
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
        stale = self._pushed_weight_files(api, repo_id, revision)
        with tempfile.TemporaryDirectory() as scratch:
            folder = os.path.join(scratch, "model")
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            self._write_memory(folder)  # one consistent snapshot of the memory, with its metadata
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

    @staticmethod
    def _pushed_weight_files(api: HfApi, repo_id: str, revision: str | None) -> set[str]:
        """Top-level weight files a model push wrote to `revision` before (per its index; a single weights file)."""
        try:
            present = set(api.list_repo_files(repo_id, revision=revision))
        except RevisionNotFoundError:
            return set()
        owned = {WEIGHTS_FILE, INDEX_FILE}
        if INDEX_FILE in present:
            path = _download(repo_id, INDEX_FILE, revision, api.token, None)
            owned |= set(_read_json_object(path, f"{repo_id} {INDEX_FILE}").get("weight_map", {}).values())
        return {name for name in owned & present if "/" not in name and glob.escape(name) == name}

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
        state_path = _download(repo_id, MEMORY_STATE_FILE, revision, token, cache_dir)
        memory_path = _download(repo_id, MEMORY_FILE, revision, token, cache_dir)
        if memory_path is None:
            raise ValueError(f"{where} has no {MEMORY_FILE}; push one with model.push_memory_to_hub")
        try:
            metadata = {} if state_path is None else _read_json_object(state_path, MEMORY_STATE_FILE)
            if metadata.get("sha256") not in (None, sha256_file(memory_path)):
                raise MemoryStateError(
                    f"{MEMORY_FILE} does not match the sha256 in {MEMORY_STATE_FILE} (the branch moved during the "
                    "download, or an upload was incomplete); load it again or pin a commit sha"
                )
            state = MemoryState.load(memory_path)
            if metadata.get("content_hash") not in (None, state.content_hash()):
                raise MemoryStateError(f"{MEMORY_FILE} does not match the content_hash in {MEMORY_STATE_FILE}")
            if state.fingerprint is None:
                state.fingerprint = metadata.get("fingerprint")
            if "long_term_sha256" in metadata:
                store_path = _download(repo_id, LONG_TERM_FILE, revision, token, cache_dir)
                if store_path is None or sha256_file(store_path) != metadata["long_term_sha256"]:
                    raise MemoryStateError(
                        f"{LONG_TERM_FILE} is missing or does not match {MEMORY_STATE_FILE}; load it again or pin a "
                        "commit sha"
                    )
                read = load_mplus_memory if self.is_mplus else load_store
                state = dataclasses.replace(state, long_term=read(store_path, state.fingerprint))
            self.load_memory_state(state, allow_other_model)
        except (MemoryStateError, LongTermStoreError, MPlusMemoryError) as err:
            raise MemoryStateError(f"{where}: {err}") from None
        return metadata

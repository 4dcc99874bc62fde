"""The memory's own safetensors file beside the weights, written atomically and listed in the shard index."""

import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MEMORY_FILE = "memory.safetensors"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_SHARD = "model-00001-of-00001.safetensors"


def atomic_write(path: str, write) -> None:
    """Run `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_memory_shard(folder: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Save the memory buffers to `memory.safetensors` and point the index at it (creating one if needed)."""
    folder = os.fspath(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(os.path.join(folder, MEMORY_FILE), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    index_path = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.exists(single):
        os.replace(single, os.path.join(folder, SINGLE_SHARD))
        with safe_open(os.path.join(folder, SINGLE_SHARD), "pt") as handle:
            index = {"metadata": {}, "weight_map": dict.fromkeys(handle.keys(), SINGLE_SHARD)}
    else:
        with open(index_path) as handle:
            index = json.load(handle)
    weight_map = {k: v for k, v in index["weight_map"].items() if v != MEMORY_FILE}
    weight_map.update(dict.fromkeys(tensors, MEMORY_FILE))
    index["weight_map"] = dict(sorted(weight_map.items()))

    def dump(path: str) -> None:
        with open(path, "w") as handle:
            json.dump(index, handle, indent=2)

    atomic_write(index_path, dump)

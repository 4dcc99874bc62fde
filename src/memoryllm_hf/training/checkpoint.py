"""Training checkpoints (only what trains, plus what an exact resume needs) and exported adapters.

A checkpoint folder `step-000123/` holds:
* `trainables.safetensors`: the trainable parameters (adapters, `bos_embedding`, `new_memory_positional_emb`);
* `optimizer.pt`, `scheduler.pt`, `trainer_state.json` (step, loss history);
* `rank-<r>/memory.safetensors` and `rank-<r>/stream.pt`: each rank's memory pool (written by the injections of
  training, needed to resume exactly) and its generators (process choice, dropout) and forgetting cache.
It is written as `step-000123.partial/` and renamed when complete, so a crash never leaves a half checkpoint.
An exported adapter folder holds `trainables.safetensors` and `model_config.json` (how to rebuild the model).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..modeling import MEMORY_FILE, MemoryState
from .config import ModelConfig
from .model import build_model, trainable_state
from .objective import StreamState

TRAINABLES_FILE = "trainables.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
STATE_FILE = "trainer_state.json"
PARTIAL = ".partial"


def save_trainables(model, folder: Path, dtype: torch.dtype | None = None) -> None:
    tensors = {k: v.to(dtype or v.dtype).contiguous().cpu() for k, v in trainable_state(model).items()}
    save_file(tensors, folder / TRAINABLES_FILE, metadata={"format": "pt"})


def load_trainables(model, path: Path) -> None:
    """Copy saved trainables into the model's parameters (names and shapes must match exactly)."""
    saved = load_file(path)
    params = dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise ValueError(f"{path} has parameters this model lacks (different adapter config?): {missing[:5]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def export_adapter(model, model_config: ModelConfig, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write the trained parameters and the model config that rebuilds their model (see `load_trained_model`)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_trainables(model, folder, dtype)
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_config), indent=2))


def is_adapter_folder(path: str | Path) -> bool:
    """True for a folder exported by training (`OUT/adapter`: trained parameters + the model config)."""
    return (Path(path) / TRAINABLES_FILE).is_file() and (Path(path) / MODEL_CONFIG_FILE).is_file()


def load_trained_model(folder: str | Path, **memory):
    """(model, tokenizer) rebuilt from an exported adapter folder: the base with fresh memory + trained parameters.
    `memory` overrides pool settings of the training run (e.g. `num_memory_tokens`); the adapters fit any pool."""
    folder = Path(folder)
    config = ModelConfig(**json.loads((folder / MODEL_CONFIG_FILE).read_text()))
    if "memory_update" in memory and memory["memory_update"] != config.memory_update:
        raise ValueError(f"{folder} was trained with the {config.memory_update!r} rule; it cannot read another")
    memory.pop("memory_update", None)
    config.memory = {**config.memory, **memory}
    model, tokenizer = build_model(config)
    load_trainables(model, folder / TRAINABLES_FILE)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def rank_folder(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank}"


def save_checkpoint(folder: Path, accelerator, model, optimizer, scheduler, stream: StreamState, state: dict) -> None:
    """Write a checkpoint from every rank into `folder` (atomically: `folder.partial` renamed by the main rank)."""
    partial = folder.with_name(folder.name + PARTIAL)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    mine = rank_folder(partial, accelerator.process_index)
    mine.mkdir()
    model.memory_state().save(mine / MEMORY_FILE)  # the one memory file format (checked, hashed)
    generators = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save({"stream": stream.to_dict(), "torch_rng": generators}, mine / "stream.pt")
    if accelerator.is_main_process:
        save_trainables(model, partial)
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        (partial / STATE_FILE).write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, accelerator, model, optimizer, scheduler, stream: StreamState) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (step, history)."""
    mine = rank_folder(folder, accelerator.process_index)
    if not mine.exists():
        raise ValueError(f"{folder} was written by fewer ranks; resume with the same number of processes")
    load_trainables(model, folder / TRAINABLES_FILE)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    model.load_memory_state(MemoryState.load(mine / MEMORY_FILE))
    saved = torch.load(mine / "stream.pt", weights_only=False)
    stream.load_dict(saved["stream"])
    torch.set_rng_state(saved["torch_rng"]["cpu"])
    if saved["torch_rng"]["cuda"]:
        torch.cuda.set_rng_state_all(saved["torch_rng"]["cuda"])
    return json.loads((folder / STATE_FILE).read_text())


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir/checkpoints`, oldest first."""
    root = output_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep >= 1)."""
    for old in checkpoints(output_dir)[: -max(keep, 1)]:
        shutil.rmtree(old)

"""Data-parallel training: 2 CPU processes (gloo) launched with `accelerate launch` stay in sync and match a single
process that replays both ranks (each rank has its own examples, memory pool and process choices).

Run as a script, this file is the worker that `accelerate launch` starts.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from memoryllm_hf.training import Trainer, config_from_dict, make_accelerator
from memoryllm_hf.training.model import build_model, mark_trainable
from memoryllm_hf.training.objective import MemoryTrainingModule, StreamState, plan_step
from memoryllm_hf.training.trainer import make_examples

WORLD = 2
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def config_values(output_dir: Path) -> dict:
    return {
        "output_dir": str(output_dir),
        "seed": 3,
        "model": {"base": "tiny", "lora": LORA, "memory": {"num_memory_tokens": 8, "num_update_tokens": 4}},
        "data": {"kind": "key_value", "key_value": {"context_repeats": 2}},
        "objective": {"lm_ratio": 0.2, "forgetting_ratio": 0.4, "full_pool_ratio": 0.5},
        "optim": {"learning_rate": 1e-2, "max_steps": 5, "warmup_steps": 1},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replay_ranks(values: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One process doing what WORLD ranks do: per rank its own memory and stream, gradients averaged over ranks."""
    config = config_from_dict(values)
    model, tokenizer = build_model(config.model)
    params = mark_trainable(model, config.model.train_memory_embeddings)
    model.train()
    module, examples = MemoryTrainingModule(model), make_examples(config, tokenizer)
    optimizer = torch.optim.AdamW(params, lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay)
    scheduler = get_scheduler(config.optim.scheduler, optimizer, config.optim.warmup_steps, config.optim.max_steps)
    streams = [StreamState.seeded(config.seed, rank) for rank in range(WORLD)]
    memories = [model.memory_state() for _ in range(WORLD)]
    rows = []
    for step in range(config.optim.max_steps):
        for rank in range(WORLD):
            model.load_memory_state(memories[rank])
            plan = plan_step(config.objective, streams[rank], examples.example(step * WORLD + rank), step)
            loss = module(plan)
            (loss / WORLD).backward()
            memories[rank] = model.memory_state()
            rows.append({"step": step + 1, "process": plan.process, "loss": loss.item()})
        torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return rows, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_two_processes_stay_in_sync_and_match_one_process(tmp_path):
    values = config_values(tmp_path / "run")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(values))
    command = [
        # the multi-process launcher (torch.distributed.run); with `cpu=True` the workers use gloo on the CPU
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(WORLD),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        __file__,
        str(config_file),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # identical after every update

    history = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    expected_rows, expected_params = replay_ranks(values)
    assert [(r["step"], r["process"]) for r in history] == [(r["step"], r["process"]) for r in expected_rows]
    assert len({r["process"] for r in history}) >= 3
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in expected_rows], abs=1e-4)
    for name, param in expected_params.items():
        torch.testing.assert_close(ranks[0][name], param, atol=1e-5, rtol=1e-4, msg=name)
    initial, _ = build_model(config_from_dict(values).model)
    moved = dict(initial.named_parameters())
    assert any(not torch.allclose(moved[n], p) for n, p in expected_params.items())  # training changed something


def run_worker(config_file: str, out: str) -> None:
    torch.set_num_threads(1)
    config = config_from_dict(json.loads(Path(config_file).read_text()))
    trainer = Trainer(config, make_accelerator(config, cpu=True))
    trainer.train()
    state = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(state, Path(out) / f"rank{trainer.accelerator.process_index}.safetensors")


if __name__ == "__main__":
    run_worker(*sys.argv[1:3])

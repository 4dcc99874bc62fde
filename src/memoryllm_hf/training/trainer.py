"""The training loop on `accelerate`: one code path for CPU, one GPU and data parallelism over several processes.

Each rank trains on its own examples with its own memory pool (as the official DeepSpeed runs did); gradients are
averaged across ranks. Example `i` of a step is a pure function of (step, micro-step, rank), so a run resumes exactly
from a checkpoint and a single process can replay what several ranks computed.
"""

import json
import time
import warnings
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..loading import torch_dtype
from .checkpoint import checkpoints, export_adapter, load_checkpoint, prune_checkpoints, save_checkpoint
from .config import TrainConfig
from .data import DocumentExamples, ExampleSource
from .model import build_model, mark_trainable
from .objective import PROCESSES, MemoryTrainingModule, StreamState, enable_gradient_checkpointing, plan_step
from .plots import plot_loss_curves
from .synthetic import KeyValueTask


def make_accelerator(config: TrainConfig, cpu: bool = False) -> Accelerator:
    """An Accelerator for this config. DDP: ranks keep their own memory pools (`broadcast_buffers=False`), and
    each step's process leaves some adapter unused (`find_unused_parameters=True`)."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    return Accelerator(
        mixed_precision=config.optim.mixed_precision,
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        kwargs_handlers=[ddp],
        cpu=cpu,
    )


def make_examples(config: TrainConfig, tokenizer) -> ExampleSource:
    """The synthetic key/value task, or the (contexts, segment) examples of the configured documents."""
    data = config.data
    if data.kind == "key_value":
        return KeyValueTask(**{"seed": config.seed, **data.key_value})
    return DocumentExamples.from_files(
        data.files,
        tokenizer,
        config.seed,
        data.text_field,
        data.group_field,
        data.min_chunk_tokens,
        data.max_chunk_tokens,
        data.max_segment_tokens,
    )


# More passes over the documents than this and a small corpus's segments (always the documents' last tokens) get
# memorised by the adapters instead of being read from memory.
MAX_EPOCHS_BEFORE_WARNING = 4


def warn_if_documents_repeat(config: TrainConfig, examples: ExampleSource, accelerator) -> None:
    """Warn (once, main process) when training will show every document's segment more than a few times."""
    if config.data.kind != "documents" or not accelerator.is_main_process:
        return
    optim = config.optim
    examples_used = optim.max_steps * optim.gradient_accumulation_steps * accelerator.num_processes
    epochs = examples_used / len(examples)
    if epochs > MAX_EPOCHS_BEFORE_WARNING:
        warnings.warn(
            f"{len(examples)} documents for {examples_used} examples: every document (and its segment, its last "
            f"tokens) is seen ~{epochs:.0f} times, enough for the adapters to learn the segments by heart instead of "
            "reading memory; use more or shorter documents (e.g. one per paragraph: drop data.group_field)",
            stacklevel=2,
        )


class Trainer:
    """Trains the adapters and memory-side vectors of a MemoryLlama with the paper's objective."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None):
        self.config = config
        self.accelerator = accelerator or make_accelerator(config)
        set_seed(config.seed)
        self.model, self.tokenizer = build_model(config.model)
        if config.data.kind == "documents" and config.data.min_chunk_tokens < self.model.config.min_inject_tokens:
            raise ValueError(
                f"data.min_chunk_tokens ({config.data.min_chunk_tokens}) is below the model's min_inject_tokens "
                f"({self.model.config.min_inject_tokens}); raise it or lower model.memory.min_inject_tokens"
            )
        params = mark_trainable(self.model, config.model.train_memory_embeddings)
        self.model.train()
        if config.model.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.examples = make_examples(config, self.tokenizer)
        warn_if_documents_repeat(config, self.examples, self.accelerator)
        optim = config.optim
        optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
        # Stepped here once per update (not prepared: accelerate would step it once per process).
        self.scheduler = get_scheduler(optim.scheduler, optimizer, optim.warmup_steps, optim.max_steps)
        self.params = params
        self.module, self.optimizer = self.accelerator.prepare(MemoryTrainingModule(self.model), optimizer)
        self.stream = StreamState.seeded(config.seed, self.accelerator.process_index)
        self.step = 0
        self.history: list[dict] = []

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def example_index(self, step: int, micro: int) -> int:
        accelerator = self.accelerator
        accumulation = self.config.optim.gradient_accumulation_steps
        return (step * accumulation + micro) * accelerator.num_processes + accelerator.process_index

    def train_step(self) -> list[dict]:
        """One optimizer update (all micro-steps); returns every rank's {"step", "process", "loss"} rows."""
        accelerator, optim = self.accelerator, self.config.optim
        local = []
        for micro in range(optim.gradient_accumulation_steps):
            with accelerator.accumulate(self.module):
                example = self.examples.example(self.example_index(self.step, micro))
                plan = plan_step(self.config.objective, self.stream, example, self.step)
                loss = self.module(plan)
                accelerator.backward(loss)
                if accelerator.sync_gradients and optim.max_grad_norm:
                    accelerator.clip_grad_norm_(self.params, optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            local.append([float(PROCESSES.index(plan.process)), loss.detach().float().item()])
        self.scheduler.step()
        rows = accelerator.gather(torch.tensor(local, device=accelerator.device)).cpu().tolist()
        self.step += 1
        return [{"step": self.step, "process": PROCESSES[int(p)], "loss": loss} for p, loss in rows]

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in `output_dir/checkpoints`; False when there is none."""
        found = checkpoints(self.output_dir)
        if not found:
            return False
        state = load_checkpoint(found[-1], self.accelerator, self.model, self.optimizer, self.scheduler, self.stream)
        self.step, self.history = state["step"], state["history"]
        return True

    def save_checkpoint(self) -> Path:
        folder = self.output_dir / "checkpoints" / f"step-{self.step:06d}"
        state = {"step": self.step, "history": self.history}
        save_checkpoint(folder, self.accelerator, self.model, self.optimizer, self.scheduler, self.stream, state)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
        return folder

    def train(self, steps: int | None = None) -> dict:
        """Train up to `optim.max_steps` (or `steps` more updates); saves checkpoints, the adapter and loss curves."""
        config, accelerator = self.config, self.accelerator
        last = config.optim.max_steps if steps is None else min(self.step + steps, config.optim.max_steps)
        bar = tqdm(total=last, initial=self.step, desc="Training", disable=not accelerator.is_main_process)
        start = time.perf_counter()
        while self.step < last:
            rows = self.train_step()
            self.history += rows
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == last:
                bar.set_postfix(loss=f"{sum(r['loss'] for r in rows) / len(rows):.3f}")
            if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save_checkpoint()
            if self.out_of_time(start):
                break
        bar.close()
        wall = time.perf_counter() - start
        if accelerator.is_main_process:
            self.write_outputs()
        accelerator.wait_for_everyone()
        return {"steps": self.step, "wall_s": wall, "final_loss": self.recent_loss()}

    def out_of_time(self, start: float) -> bool:
        """Whether `optim.max_minutes` have passed on any rank (all ranks take the same decision)."""
        if self.config.optim.max_minutes is None:
            return False
        late = float(time.perf_counter() - start > 60 * self.config.optim.max_minutes)
        return bool(self.accelerator.reduce(torch.tensor(late, device=self.accelerator.device), "sum") > 0)

    def recent_loss(self, window: int = 50) -> dict[str, float]:
        """Mean loss per process over the last `window` updates."""
        recent = [row for row in self.history if row["step"] > self.step - window]
        return {
            p: sum(r["loss"] for r in rows) / len(rows)
            for p in PROCESSES
            if (rows := [r for r in recent if r["process"] == p])
        }

    def write_outputs(self) -> None:
        """Adapter folder, loss history (jsonl), loss curves (PNG) and the config used, under `output_dir`."""
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        export_adapter(self.model, self.config.model, out / "adapter", torch_dtype(self.config.export_dtype))
        (out / "train_config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        (out / "losses.jsonl").write_text("".join(json.dumps(row) + "\n" for row in self.history))
        title = f"{self.config.model.base} ({self.config.model.memory_update} rule): training loss"
        plot_loss_curves(self.history, out / "loss_curve.png", title)

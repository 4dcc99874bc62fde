"""A short LoRA fine-tune of MemoryLlama on SQuAD paragraphs: learn to continue a text from its memory.

    python examples/peft_finetune.py --tiny                  # random tiny model, bytes as tokens: seconds on a CPU
    python examples/peft_finetune.py                         # SmolLM2-135M-Instruct (offline default), minutes
    python examples/peft_finetune.py --tiny --write-read     # the official design: a write and a read adapter
    python examples/peft_finetune.py --device cuda --data PATH/squad_paragraphs.jsonl --steps 300   # a GPU

Each example injects the first part of a paragraph (`new_memory_slots`: a differentiable, uncommitted write) and
scores the next part read from those slots alone, so the loss reaches the LoRA on the write and the read path. The
held-out loss before and after training, the training curve (PNG) and the adapter are written to `--output`.
"""

import argparse
import json
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from memoryllm_hf.peft_utils import add_memory_adapters
from memoryllm_hf import load

# SQuAD training paragraphs shipped in the repository (data/train/README.md).
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "train" / "squad_train_paragraphs.jsonl"


def load_model(tiny: bool):
    """(model, encode): the model with a fresh memory and a function text -> token ids."""
    if tiny:
        pool = {"memory_update": "input", "fresh_pool": "grow", "num_memory_tokens": 64, "num_update_tokens": 16}
        model, tokenizer = load("tiny", **pool)
    else:
        model, tokenizer = load("default", num_memory_tokens=1024, num_update_tokens=64)
    return model, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def examples(path: Path, encode, context: int, target: int, count: int, seed: int) -> list[tuple]:
    """(context ids [1, c], target ids [1, t]) pairs from paragraphs long enough for both parts."""
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    pairs = []
    for text in rows:
        ids = encode(text)
        if len(ids) >= context + target:
            pairs.append((torch.tensor([ids[:context]]), torch.tensor([ids[context : context + target]])))
        if len(pairs) == count:
            break
    return pairs


def memory_loss(model, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    context, target = context.to(model.device), target.to(model.device)
    return model(target, memory_slots=model.new_memory_slots(context), labels=target).loss


@torch.no_grad()
def mean_loss(model, pairs: list[tuple]) -> float:
    return sum(memory_loss(model, c, t).item() for c, t in pairs) / len(pairs)


def save_curve(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, alpha=0.5, label="step")
    window = max(1, len(losses) // 10)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    ax.plot(range(1, len(losses) + 1), smooth, lw=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (continuation read from memory)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny model instead of SmolLM2")
    parser.add_argument("--write-read", action="store_true", help="two named adapters: write (inject), read")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL with a `text` field per line")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 150 tiny, 60 SmolLM2)")
    parser.add_argument("--context-tokens", type=int, default=48)
    parser.add_argument("--target-tokens", type=int, default=24)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-2 tiny, 1e-3 SmolLM2")
    parser.add_argument("--held-out", type=int, default=16, help="texts kept aside to measure the loss")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/peft-finetune"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    steps = args.steps or (150 if args.tiny else 60)
    lr = args.lr or (1e-2 if args.tiny else 1e-3)

    model, encode = load_model(args.tiny)
    model.to(args.device)
    pairs = examples(args.data, encode, args.context_tokens, args.target_tokens, steps + args.held_out, args.seed)
    if len(pairs) <= args.held_out:
        parser.error(f"{args.data} has {len(pairs)} texts long enough; need more than --held-out={args.held_out}")
    train_pairs, held_out = pairs[args.held_out :], pairs[: args.held_out]
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = add_memory_adapters(model, config) if args.write_read else get_peft_model(model, config)
    peft_model.print_trainable_parameters()

    before = mean_loss(peft_model.eval(), held_out)
    print(f"held-out loss before: {before:.4f}")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses = []
    bar = tqdm(range(steps), desc="LoRA", unit="step")
    for step in bar:
        context, target = train_pairs[step % len(train_pairs)]
        loss = memory_loss(peft_model, context, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    after = mean_loss(peft_model.eval(), held_out)
    print(f"held-out loss after:  {after:.4f} ({after / before:.3f}x of before)")

    args.output.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(args.output / "adapter")
    save_curve(losses, args.output / "loss.png")
    print(f"saved the adapter to {args.output / 'adapter'} and the curve to {args.output / 'loss.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

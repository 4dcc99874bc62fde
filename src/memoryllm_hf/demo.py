"""The offline quickstart: SmolLM2-135M-Instruct + a training-free memory learns invented facts, survives a save,
and answers again after a reload in a fresh process that only has transformers (remote code)."""

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from .greedy import reply
from .loading import load

FACTS = [
    "Zorblat Quenn was born in the town of Velmora in the year 1962.",
    "The capital of the island nation of Trevania is the port city of Kusholm.",
    "The Brinmoor Prize for chemistry is awarded every year in Ostrava-Lune.",
]
QUESTIONS = [
    "Where was Zorblat Quenn born?",
    "What is the capital of Trevania?",
    "In which city is the Brinmoor Prize awarded?",
]

# Runs in a new interpreter that cannot import memoryllm_hf: only transformers and the checkpoint's own code.
RELOAD = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "memoryllm_hf":
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Block())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, questions = sys.argv[1], sys.argv[2:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    print(f"reloaded {type(model).__name__} from {type(model).__module__} ({model.num_injections} injections)")
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"  Q: {question}\\n  A: {answer.strip()}")
    """
)


def unrelated_texts(count: int) -> list[str]:
    """`count` Wikipedia paragraphs that have nothing to do with the facts (the repository's SQuAD training text,
    CC BY-SA 4.0; a generated stand-in when the package is installed without the repository)."""
    path = Path(__file__).resolve().parents[2] / "data" / "train" / "squad_train_paragraphs.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [row["text"] for row in rows[::max(1, len(rows) // count)][:count]]
    return [f"Report {i}: the committee met on day {i} and reviewed {3 * i} proposals about roads." for i in range(count)]


def fact_slots_in_pool(model, facts: int) -> list[int]:
    """Per fact (injections 1..facts): how many of its slots the pool still holds in layer 0."""
    written = model.memory_written_at[0]
    return [int((written == number).sum()) for number in range(1, facts + 1)]


def ask(model, tokenizer, question: str, use_memory: bool = True) -> str:
    """Greedy answer of the chat model to one question."""
    return reply(model, tokenizer, [{"role": "user", "content": question}], 24, use_memory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memoryllm-hf demo", description=__doc__)
    parser.add_argument("--output", default="outputs/quickstart-memory", help="folder for the saved model + memory")
    parser.add_argument("--num-memory-tokens", type=int, default=512, help="N slots per layer")
    parser.add_argument("--num-update-tokens", type=int, default=64, help="K slots per injection")
    parser.add_argument(
        "--unrelated", type=int, default=24, help="unrelated paragraphs injected after the facts (default: 24)"
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="an OUT/adapter folder written by `memoryllm_hf.train` (default: none, the training-free memory)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    start = time.perf_counter()
    model, tokenizer = load(
        args.adapter or "default", num_memory_tokens=args.num_memory_tokens, num_update_tokens=args.num_update_tokens
    )
    cfg = model.config
    print(
        f"SmolLM2-135M-Instruct + memory: N={cfg.num_memory_tokens} slots x {cfg.num_hidden_layers} layers, "
        f"K={cfg.num_update_tokens} per injection, rule={cfg.memory_update!r} "
        f"({'adapter ' + args.adapter if args.adapter else 'training-free'}), "
        f"loaded in {time.perf_counter() - start:.1f}s\n"
    )

    print("Without memory:")
    for question in QUESTIONS:
        print(f"  Q: {question}\n  A: {ask(model, tokenizer, question, use_memory=False)}")

    start = time.perf_counter()
    for fact in FACTS:
        model.inject(fact, tokenizer=tokenizer)
    print(
        f"\nInjected {len(FACTS)} facts in {time.perf_counter() - start:.2f}s "
        f"({model.num_filled_slots} of {cfg.num_memory_tokens} slots filled):"
    )
    for fact in FACTS:
        print(f"  + {fact}")

    print("\nWith memory (the facts are not in the prompt):")
    for question in QUESTIONS:
        print(f"  Q: {question}\n  A: {ask(model, tokenizer, question)}")

    filler = unrelated_texts(args.unrelated)
    start = time.perf_counter()
    updates = model.inject(filler, tokenizer=tokenizer, progress=False)
    print(
        f"\nThen {len(filler)} unrelated Wikipedia paragraphs ({updates} more updates, "
        f"{time.perf_counter() - start:.1f}s): the pool of {cfg.num_memory_tokens} slots has dropped every slot of "
        f"the facts ({sum(fact_slots_in_pool(model, len(FACTS)))} left); the long-term store keeps "
        f"{len(model.long_term_memory)} injections."
    )
    read_mode = cfg.read_mode
    for mode in dict.fromkeys([read_mode, "pool"]):
        cfg.read_mode = mode
        print(f"\nread_mode={mode!r}:")
        for question in QUESTIONS:
            print(f"  Q: {question}\n  A: {ask(model, tokenizer, question)}")
    cfg.read_mode = read_mode

    output = Path(args.output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"\nSaved to {output}/ (memory in memory.safetensors). Reloading in a fresh process without memoryllm_hf:")
    result = subprocess.run([sys.executable, "-c", RELOAD, str(output), *QUESTIONS], text=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

"""`memoryllm-hf ask` with and without `memoryllm-hf serve`, on a folder holding many stored injections.

Two steps (the first is long and resumable; it saves the memory every `--save-every` injections):

    python -m benchmarks.serve_ask build FOLDER --injections 1000 --threads 1
    python -m benchmarks.serve_ask measure FOLDER --threads 1 --json benchmarks/results/cpu/serve_ask.json

`build` makes a SmolLM2 (default model) folder and injects one short synthetic fact per injection (fact i names a
person, an object and a city). `measure` times, as separate processes the way a user runs them: the model's load
time (`memoryllm_hf.load(FOLDER)`), `memoryllm-hf ask` without a server, the server's start (until it answers),
then `ask` through the server (first and later questions), the same question as one HTTP request (the server's own
work), `stats` through the server (what a client process costs) and a one-sentence `inject` through it.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

NAMES = ["Mira", "Tobin", "Asha", "Quill", "Renko", "Ilse", "Dario", "Yusra", "Fenn", "Oriel", "Kasimir", "Lune"]
OBJECTS = ["lantern", "violin", "compass", "ledger", "kettle", "telescope", "map", "clock", "key", "mirror"]
CITIES = ["Velmora", "Kusholm", "Brinmoor", "Tessaly", "Orvane", "Glimmerdale", "Pashtor", "Yellowmere", "Dunreach"]


def fact(i: int) -> str:
    name = f"{NAMES[i % len(NAMES)]} {NAMES[(i // len(NAMES)) % len(NAMES)]}-{i}"
    return f"Record {i}: {name} keeps the {OBJECTS[i % len(OBJECTS)]} in {CITIES[(i * 7) % len(CITIES)]}."


def build(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from memoryllm_hf import load
    from memoryllm_hf.folder import save_memory

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        model, tokenizer = load("default")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    model, tokenizer = load(folder)
    start = model.num_injections
    with torch.no_grad():
        for i in tqdm(range(start, args.injections), initial=start, total=args.injections, desc="Injecting"):
            model.inject(fact(i), tokenizer=tokenizer)
            if (i + 1) % args.save_every == 0 or i + 1 == args.injections:
                save_memory(folder, model)
    print(f"{folder}: {model.num_injections} injections")


def timed(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout.strip()


def measure(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cli = [sys.executable, "-m", "memoryllm_hf.cli"]
    question = f"Where does {fact(args.question_fact).split(': ')[1].split(' keeps')[0]} keep the " + (
        f"{OBJECTS[args.question_fact % len(OBJECTS)]}?"
    )
    rows = {}
    load_code = (
        f"import time, torch; torch.set_num_threads({args.threads}); t = time.perf_counter(); import memoryllm_hf; "
        f"m, _ = memoryllm_hf.load({args.folder!r}); print(m.num_injections, time.perf_counter() - t)"
    )
    seconds, out = timed([sys.executable, "-c", load_code], env)
    rows["load_process_s"], rows["load_s"] = seconds, float(out.split()[1])
    rows["injections"] = int(out.split()[0])
    print(f"load: {rows['load_s']:.1f} s inside a process of {seconds:.1f} s ({rows['injections']} injections)")
    seconds, answer = timed([*cli, "ask", args.folder, question, "--threads", str(args.threads)], env)
    rows["ask_without_server_s"], rows["answer_without_server"] = seconds, answer
    print(f"ask without a server: {seconds:.1f} s: {answer!r}")
    start = time.perf_counter()
    server = subprocess.Popen([*cli, "serve", args.folder, "--threads", str(args.threads)], env=env)
    try:
        from memoryllm_hf.client import wait_for_server

        wait_for_server(args.folder, timeout=1800)
        rows["serve_start_s"] = time.perf_counter() - start
        print(f"server answering after {rows['serve_start_s']:.1f} s")
        for name in ("first", "second", "third"):
            seconds, answer = timed([*cli, "ask", args.folder, question], env)
            rows[f"ask_with_server_{name}_s"], rows["answer_with_server"] = seconds, answer
            print(f"ask with the server ({name}): {seconds:.1f} s: {answer!r}")
        server_handle = wait_for_server(args.folder)
        start = time.perf_counter()
        server_handle.request("POST", "/ask", {"question": question})
        rows["ask_request_only_s"] = time.perf_counter() - start  # the server's work, no client process
        print(f"the same question as one HTTP request from this process: {rows['ask_request_only_s']:.1f} s")
        rows["stats_with_server_s"] = timed([*cli, "stats", args.folder], env)[0]  # a client process, little work
        print(f"stats with the server (the cost of a client process): {rows['stats_with_server_s']:.1f} s")
        seconds, out = timed([*cli, "inject", args.folder, "--text", fact(args.injections_for_inject)], env)
        rows["inject_with_server_s"] = seconds
        print(f"inject with the server: {seconds:.1f} s: {out}")
    finally:
        server.terminate()
        server.wait(timeout=600)
    rows.update(question=question, threads=args.threads)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build")
    b.add_argument("folder")
    b.add_argument("--injections", type=int, default=1000)
    b.add_argument("--save-every", type=int, default=100)
    b.add_argument("--threads", type=int, default=1)
    b.set_defaults(func=build)
    m = sub.add_parser("measure")
    m.add_argument("folder")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--question-fact", type=int, default=7)
    m.add_argument("--injections-for-inject", type=int, default=100000)
    m.add_argument("--json", type=Path)
    m.set_defaults(func=measure)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

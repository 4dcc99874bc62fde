"""One base model on the Hub, many memories: push the model once, then each memory change as one small commit.

    python examples/push_memory.py --local                          # a local Hub server started here (offline)
    python examples/push_memory.py --endpoint http://127.0.0.1:8000 --repo tester/memories
    python examples/push_memory.py --repo you/memories              # the real Hub (HF_TOKEN or `hf auth login`)
    python examples/push_memory.py --local --model smollm2          # SmolLM2-135M-Instruct instead of a tiny model

The flow: push the whole model (weights, memory shard, remote code, model card); inject and push only the memory to
main; inject more and push that memory to a new branch; then load every memory back by branch or commit sha, with
`from_pretrained(repo, revision=...)` and with `load_memory_from_hub`, and check they are bit-identical.
"""

import argparse
import contextlib
import tempfile

import torch
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM

from memoryllm_hf.hub import hub_endpoint
from memoryllm_hf.testing import LocalHub
from memoryllm_hf import load

FACTS = [
    "Zorblat Quenn was born in the town of Velmora in the year 1962 and later became a lighthouse keeper.",
    "The Velmora lighthouse was painted green in 1987 after a vote of the town council.",
]


def load_model(name: str):
    """(model, tokenizer): a tiny random model (character tokenizer) or SmolLM2 with a small pool."""
    pool = {"num_memory_tokens": 512, "num_update_tokens": 64} if name != "tiny" else {}
    return load("tiny" if name == "tiny" else "default", memory_update="input", fresh_pool="grow", **pool)


def inject(model, tokenizer, text: str) -> None:
    model.inject(text, tokenizer=tokenizer)


def same_memory(model, state) -> bool:
    return all(torch.equal(getattr(model, name), tensor) for name, tensor in state.as_buffers().items())


def changed_files(api: HfApi, repo: str, old: str, new: str) -> list[str]:
    before, after = (
        {f.path: f.blob_id for f in api.list_repo_tree(repo, revision=r, recursive=True)} for r in (old, new)
    )
    return sorted(path for path in after if after[path] != before.get(path))


def run(repo: str, model_name: str) -> None:
    api = HfApi()
    model, tokenizer = load_model(model_name)
    inject(model, tokenizer, FACTS[0])
    first = model.push_to_hub(repo, tokenizer=tokenizer, commit_message="model with its first memory")
    state_first = model.memory_state()
    print(f"pushed the model: {first.commit_url}")

    inject(model, tokenizer, FACTS[1])
    second = model.push_memory_to_hub(repo, commit_message="team memory, day 2")
    state_main = model.memory_state()
    size = {f.path: f.size for f in api.list_repo_tree(repo, revision=second.oid, recursive=True)}
    print(
        f"memory push to main: files changed {changed_files(api, repo, first.oid, second.oid)}, "
        f"{size['memory.safetensors'] / 2**20:.2f} MiB of {sum(size.values()) / 2**20:.2f} MiB in the repo"
    )

    inject(model, tokenizer, "Snapshot for a customer: " + FACTS[0])
    branch = model.push_memory_to_hub(repo, revision="customer-b", create_branch=True)
    state_branch = model.memory_state()
    print(f"memory push to branch customer-b: {branch.commit_url}")

    for revision, state in ((first.oid, state_first), ("main", state_main), ("customer-b", state_branch)):
        loaded = AutoModelForCausalLM.from_pretrained(repo, revision=revision, trust_remote_code=True)
        print(
            f"from_pretrained(revision={revision[:12]!r}): {loaded.num_injections} injections, "
            f"bit-identical: {same_memory(loaded, state)}"
        )
    metadata = loaded.load_memory_from_hub(repo, revision=first.oid)
    print(
        f"load_memory_from_hub(first commit): {metadata['injections']} injection(s), "
        f"bit-identical: {same_memory(loaded, state_first)}"
    )
    print("branches:", {b.name: b.target_commit[:8] for b in api.list_repo_refs(repo).branches})
    print("history of main:", [c.title for c in api.list_repo_commits(repo)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="start a local Hub server for this run")
    where.add_argument("--endpoint", help="Hub URL (default: the real Hub or $HF_ENDPOINT)")
    parser.add_argument("--repo", default="tester/memory-demo", help="repo id to create/update")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        if args.local:
            server = stack.enter_context(LocalHub())
            cache = stack.enter_context(tempfile.TemporaryDirectory())
            stack.enter_context(hub_endpoint(server.url, cache_dir=cache, token="local-hub"))
            print(f"local Hub at {server.url}")
        elif args.endpoint:
            stack.enter_context(hub_endpoint(args.endpoint))
        run(args.repo, args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

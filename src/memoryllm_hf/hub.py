"""Hub helpers: point an already-imported Hub client at another endpoint, and the `push` CLI subcommand.

The model API itself lives on the model (`push_to_hub`, `push_memory_to_hub`, `load_memory_from_hub`).
"""

import argparse
import contextlib
import os
from collections.abc import Iterator
from urllib.parse import urlsplit


@contextlib.contextmanager
def hub_endpoint(url: str, cache_dir: str | os.PathLike | None = None, token: str | None = None) -> Iterator[None]:
    """Send every Hub call of this process (huggingface_hub, transformers, peft) to `url` inside the block.

    `HF_ENDPOINT` is read once, when huggingface_hub is imported; this patches the values derived from it (and the
    client instances built from them) and sets `HF_ENDPOINT` for child processes. `cache_dir` replaces the Hub
    download cache and `token` the Hub token (`HF_TOKEN`) for the block. Everything is restored on exit.
    """
    from huggingface_hub import constants, hf_api
    from transformers.utils import hub as transformers_hub

    url = url.rstrip("/")
    patches = [
        (constants, "ENDPOINT", url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(url).hostname}),
        (hf_api.api, "endpoint", url),
        (transformers_hub, "_hf_api", None),
    ]
    if cache_dir is not None:
        patches.append((constants, "HF_HUB_CACHE", os.fspath(cache_dir)))
    environment = {"HF_ENDPOINT": url} | ({"HF_TOKEN": token} if token is not None else {})
    saved = [(target, name, getattr(target, name)) for target, name, _ in patches]
    saved_env = {key: os.environ.get(key) for key in environment}
    try:
        for target, name, value in patches:
            setattr(target, name, value)
        os.environ.update(environment)
        yield
    finally:
        for target, name, value in saved:
            setattr(target, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    revision: str | None = None,
    memory_only: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Push a saved MemoryLlama folder: the whole model (with its tokenizer, if saved there) or only its memory.

    A memory-only push needs the repo to hold the same model already; `revision` is then created as a branch
    (from main) when missing. Returns the commit info.
    """
    from .folder import folder_config
    from .loading import load

    folder_config(folder)
    model, tokenizer = load(folder)  # tokenizer None when the folder has none
    if memory_only:
        return model.push_memory_to_hub(
            repo_id, revision=revision, commit_message=commit_message, create_branch=revision is not None, token=token
        )
    return model.push_to_hub(
        repo_id, revision=revision, commit_message=commit_message, token=token, tokenizer=tokenizer
    )


def _push(args: argparse.Namespace) -> int:
    endpoint = hub_endpoint(args.endpoint) if args.endpoint else contextlib.nullcontext()
    with endpoint:
        commit = push_folder(args.folder, args.repo_id, args.revision, args.memory_only, args.message, args.token)
    print(f"pushed {'memory' if args.memory_only else 'model'} of {args.folder}: {commit.commit_url}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    push = subparsers.add_parser("push", help="push a saved MemoryLlama folder (or only its memory) to the Hub")
    push.add_argument("folder", help="folder written by save_pretrained")
    push.add_argument("repo_id", help="Hub repo, e.g. user/my-memory-model")
    push.add_argument("--revision", help="branch to push to (created if missing); default main")
    push.add_argument("--memory-only", action="store_true", help="one commit with only the memory files")
    push.add_argument("--endpoint", help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--token", help="Hub token (default: $HF_TOKEN or the saved login)")
    push.set_defaults(func=_push)

"""How the command line finds and uses a running `memoryllm-hf serve` of a folder.

A server names itself in `.FOLDER.serve.json` beside the folder and holds the folder's lock while it runs. So the lock
tells a live server from a stale file: a file whose server does not answer while the lock is free is left over from
a killed server and is removed. `ask`, `inject` and `stats` go through a server that answers, else run in-process
(holding the lock, so a server starting meanwhile waits for them and they never wait for it forever); `chat` is
refused while a server holds the folder.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from filelock import Timeout

HEALTH_TIMEOUT_S = 5.0
POLL_S = 0.2


def server_file(folder: str | os.PathLike) -> Path:
    """`.NAME.serve.json` beside the folder (like its lock file: it survives the folder being swapped by a save, and
    never travels with the folder to the Hub)."""
    folder = Path(os.path.realpath(folder))
    return folder.with_name(f".{folder.name}.serve.json")


class ServerError(ValueError):
    """The server refused a request (bad input; nothing changed): its message says what to do."""


@dataclass
class Server:
    """A running server of one folder, as its server file describes it."""

    url: str
    token: str
    pid: int
    folder: str

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """One JSON request; ServerError for a refusal, OSError when the server is gone or stops before answering."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {err.code} {err.reason}"
            raise ServerError(message) from None
        except (urllib.error.URLError, HTTPException, ConnectionError) as err:
            raise ConnectionError(
                f"the server of {self.folder} (pid {self.pid}, {self.url}) did not answer ({err}); a kill leaves the "
                "folder's old or new memory: `memoryllm-hf stats FOLDER` shows which"
            ) from None

    def answers(self) -> bool:
        """Whether this server is up and serves this folder."""
        try:
            health = self.request("GET", "/health", timeout=HEALTH_TIMEOUT_S)
        except (OSError, ServerError):
            return False
        return health.get("pid") == self.pid and health.get("folder") == self.folder


def read_server_file(folder: str | os.PathLike) -> dict | None:
    try:
        info = json.loads(server_file(folder).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def running_server(folder: str | os.PathLike) -> Server | None:
    """The server of `folder` if one is up and answering, else None (also while one is still loading)."""
    info = read_server_file(folder)
    if not info or info.get("state") != "ready":
        return None
    try:
        server = Server(f"http://{info['host']}:{int(info['port'])}", info["token"], int(info["pid"]), info["folder"])
    except (KeyError, TypeError, ValueError):
        return None
    return server if server.answers() else None


def wait_for_server(folder: str | os.PathLike, timeout: float = 600.0) -> Server:
    """The server of `folder` once it answers (e.g. after starting `memoryllm-hf serve` in the background)."""
    deadline = time.monotonic() + timeout
    while (server := running_server(folder)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server of {folder} answered within {timeout:.0f} s")
        time.sleep(POLL_S)
    return server


@contextlib.contextmanager
def server_or_lock(folder: str | os.PathLike, lock: bool = True) -> Iterator[Server | None]:
    """The folder's running server, or None while this process holds the folder's lock (`lock=False`: None
    without taking it, for read-only commands). Waits (saying so) while a server loads or another process holds
    the lock; removes the server file of a server that was killed."""
    if not lock and read_server_file(folder) is None:  # no server: nothing to wait for
        yield None
        return
    told, folder_lock_ = False, None
    while True:
        server = running_server(folder)
        if server is not None:
            yield server
            return
        if folder_lock_ is None:
            from .modeling import folder_lock  # (imports torch: only where no server answers)

            folder_lock_ = folder_lock(folder)
        try:
            folder_lock_.acquire(timeout=POLL_S)
        except Timeout:
            if not told:
                info = read_server_file(folder)
                loading = info is not None and info.get("state") == "loading"
                who = f"the server (pid {info.get('pid')}) to load" if loading else "another process that is updating"
                print(f"waiting for {who} {folder} ...", file=sys.stderr, flush=True)
                told = True
            continue
        try:
            stale = read_server_file(folder)
            if stale is not None:  # we hold the lock: its server is gone
                server_file(folder).unlink(missing_ok=True)
                print(f"removed the file of a stopped server (pid {stale.get('pid')})", file=sys.stderr)
            if not lock:
                folder_lock_.release()
            yield None
        finally:
            if lock:
                folder_lock_.release()
        return


# ---------------------------------------------------------------------------------------------- the routed commands
def ask(server: Server, args: argparse.Namespace) -> int:
    body = {"question": args.question, "max_new_tokens": args.max_new_tokens, "read_mode": args.read_mode}
    print(server.request("POST", "/ask", body)["answer"])
    return 0


def inject(server: Server, args: argparse.Namespace) -> int:
    from .messages import inject_message

    body = {"text": args.text, "chunk_size": args.chunk_size}
    if args.file is not None:  # read by the server (no torch import here): same checks, same messages
        body = {"file": os.path.abspath(args.file), "encoding": args.encoding, "chunk_size": args.chunk_size}
    print(inject_message(server.request("POST", "/inject", body), args.folder))
    return 0


def stats(server: Server, args: argparse.Namespace) -> int:
    from .messages import stats_text

    reply = server.request("POST", "/stats", {"png": os.path.abspath(args.png) if args.png else None})
    print(stats_text(args.folder, reply["lines"], reply["png"]))
    return 0


def chat(server: Server, args: argparse.Namespace) -> int:
    raise OSError(
        f"{args.folder} is held by `memoryllm-hf serve` (pid {server.pid}, {server.url}): stop it to chat here, or "
        "use its /v1/chat/completions endpoint"
    )


# command -> (what it does through a server, whether it runs under the folder's lock without one)
ROUTED: dict[str, tuple[Callable[[Server, argparse.Namespace], int], bool]] = {
    "ask": (ask, True),
    "inject": (inject, True),
    "stats": (stats, False),
    "chat": (chat, True),
}


def routed(command: str, in_process: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`in_process` (a subcommand's function) that goes through the folder's server when one runs."""
    remote, lock = ROUTED[command]

    def run(args: argparse.Namespace) -> int:
        with server_or_lock(args.folder, lock=lock) as server:
            return remote(server, args) if server is not None else in_process(args)

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Route the already registered `ask`, `inject`, `stats` and `chat` through a running server."""
    for command in ROUTED:
        parser = subparsers.choices[command]
        parser.set_defaults(func=routed(command, parser.get_default("func")))

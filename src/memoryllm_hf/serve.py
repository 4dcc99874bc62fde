"""`memoryllm-hf serve FOLDER`: one resident process that holds a folder's model and its lock and answers HTTP + JSON
on 127.0.0.1, so repeated questions skip loading the model (and everything it computes once per memory).

Endpoints (JSON bodies; every request but /health carries `Authorization: Bearer TOKEN`):

    GET  /health                  {"pid", "folder", "num_injections"} (no token needed)
    POST /ask                     {"question", "max_new_tokens"?, "read_mode"?} -> {"answer"}
    POST /inject                  {"text" or "file", "encoding"?, "chunk_size"?} -> the update report; the memory is
                                  saved before it answers ("file": an absolute path, read by the server)
    POST /stats                   {"png"?} -> {"lines", "png"}
    POST /snapshot                {"name"} -> {"path"};  POST /restore {"name"};  POST /undo {}
    GET  /v1/models, POST /v1/chat/completions   OpenAI-style chat completions (greedy, not streamed)

While it runs, the server file `.FOLDER.serve.json` beside the folder (mode 0600, like an API key) names its port,
pid and token; `memoryllm-hf ask/inject/stats FOLDER` find it and go through the server (see `client.py`). Every call
runs on one worker thread, in arrival order: concurrent clients never lose an update, and a reply to /inject means
the memory is on disk. A kill at any moment leaves the folder's old or new memory (saves swap in whole folders).
"""

import argparse
import difflib
import json
import os
import secrets
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from safetensors import SafetensorError

from .client import running_server, server_file
from .commands import READ_MODE_CHOICES

HOST = "127.0.0.1"
MAX_BODY_BYTES = 256 * 2**20  # like `inject --file`: a larger text is refused (split it)


class RequestError(ValueError):
    """A request the server refuses (HTTP status, message saying what to send instead)."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def fields(body: dict, required: tuple[str, ...], optional: dict) -> list:
    """The values of `required` then `optional` fields of a request body (defaults from `optional`); an unknown
    field is refused with the closest known name, a missing one by name."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    known = (*required, *optional)
    for name in body:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RequestError(f"unknown field {name!r}: {hint}the fields are {', '.join(known)}")
    missing = [name for name in required if name not in body]
    if missing:
        raise RequestError(f"missing field {missing[0]!r} (fields: {', '.join(known)})")
    return [body[name] for name in required] + [body.get(name, default) for name, default in optional.items()]


def typed(value, kind: type | tuple[type, ...], name: str, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(f"{name} must be a {want}, got {value!r}")
    return value


def checked_read_mode(value):
    """A read mode name or None (the name itself is checked by the model's config, against its table `READS`)."""
    return typed(value, str, "read_mode")


def positive(value, name: str):
    typed(value, int, name)
    if value is not None and value < 1:
        raise RequestError(f"{name} must be >= 1, got {value}")
    return value


class MemoryServer:
    """The model of one folder behind an HTTP server; `serve_forever()` until `stop()` (or SIGTERM/SIGINT)."""

    def __init__(self, folder: str | os.PathLike, port: int = 0, read_mode: str | None = None, log=print):
        self.folder, self.port, self.read_mode, self.log = str(folder), port, read_mode, log
        self.file = server_file(folder)
        self.token = secrets.token_urlsafe(24)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memoryllm-serve")
        self.held = ExitStack()  # the folder lock, taken and released on the worker thread
        self.service = None
        self.httpd: ThreadingHTTPServer | None = None
        self.routes = {
            ("POST", "/ask"): self.ask,
            ("POST", "/inject"): self.inject,
            ("POST", "/stats"): self.stats,
            ("POST", "/snapshot"): self.snapshot,
            ("POST", "/restore"): self.restore,
            ("POST", "/undo"): self.undo,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): self.chat_completions,
        }

    # ---------------------------------------------------------------------------------------------- life cycle
    def start(self) -> str:
        """Take the folder's lock, load the model, listen; returns the URL. The lock is taken on the worker thread
        (the lock is per thread) so that the saves made there hold it too."""
        self.worker.submit(self._acquire).result()
        try:
            self._write_file(state="loading")
            self.worker.submit(self._load).result()
            self.httpd = ThreadingHTTPServer((HOST, self.port), self.handler_class())
            self.httpd.daemon_threads = True
            self.port = self.httpd.server_address[1]
            self._write_file(state="ready")
        except BaseException:
            self.close()
            raise
        return f"http://{HOST}:{self.port}"

    def _acquire(self) -> None:
        from .folder import folder_config, locked

        folder_config(self.folder)  # a clear error for a folder that is not MemoryLlama, before waiting
        self.held.enter_context(locked(self.folder))

    def _load(self) -> None:
        from .commands import load_folder
        from .service import FolderService

        start = time.perf_counter()
        model, tokenizer = load_folder(self.folder, self.read_mode)
        self.service = FolderService(self.folder, model, tokenizer)
        self.log(f"loaded {self.folder} in {time.perf_counter() - start:.1f} s ({model.num_injections} injections)")
        start = time.perf_counter()
        self.service.warm_up()
        self.log(f"ready for questions after a warm-up read of {time.perf_counter() - start:.1f} s")

    def _write_file(self, state: str) -> None:
        info = {"pid": os.getpid(), "port": self.port, "host": HOST, "token": self.token, "state": state}
        info["folder"] = os.path.realpath(self.folder)
        temporary = self.file.with_name(self.file.name + f".tmp-{os.getpid()}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(info, handle)
        os.replace(temporary, self.file)

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def stop(self) -> None:
        """Stop answering (from another thread or a signal handler); the call in progress finishes and is saved."""
        if self.httpd is not None:
            threading.Thread(target=self.httpd.shutdown, daemon=True).start()

    def close(self) -> None:
        """Finish the queued calls, remove the server file, release the lock (in that order)."""
        if self.httpd is not None:
            self.httpd.server_close()
        self.worker.submit(self._release).result()
        self.worker.shutdown()

    def _release(self) -> None:
        try:
            if json.loads(self.file.read_text()).get("pid") == os.getpid():
                self.file.unlink()
        except (OSError, ValueError):
            pass
        self.held.close()

    # ---------------------------------------------------------------------------------------------- requests
    def call(self, method: str, path: str, body) -> dict:
        """Run one request on the worker thread (one at a time, in arrival order)."""
        route = self.routes.get((method, path.split("?")[0]))
        if route is None:
            known = ", ".join(f"{m} {p}" for m, p in self.routes)
            raise RequestError(f"no endpoint {method} {path} (endpoints: {known})", HTTPStatus.NOT_FOUND)
        return self.worker.submit(route, body).result()

    def ask(self, body) -> dict:
        question, max_new_tokens, read_mode = fields(body, ("question",), {"max_new_tokens": 128, "read_mode": None})
        typed(question, str, "question", allow_none=False)
        answer = self.service.ask(question, positive(max_new_tokens, "max_new_tokens"), checked_read_mode(read_mode))
        return {"answer": answer}

    def inject(self, body) -> dict:
        from .folder import read_text

        text, file, encoding, chunk_size = fields(
            body, (), {"text": None, "file": None, "encoding": "utf-8", "chunk_size": None}
        )
        if (text is None) == (file is None):
            raise RequestError('send either "text" or "file" (an absolute path the server reads)')
        if file is not None and not os.path.isabs(typed(file, str, "file")):
            raise RequestError(f"file must be an absolute path (the server's working folder is its own), got {file!r}")
        text = read_text(file, typed(text, str, "text"), typed(encoding, str, "encoding", allow_none=False))
        return self.service.inject(text, positive(chunk_size, "chunk_size"))

    def stats(self, body) -> dict:
        (png,) = fields(body or {}, (), {"png": None})
        if png is not None and not os.path.isabs(typed(png, str, "png")):
            raise RequestError(f"png must be an absolute path (the server's working folder is its own), got {png!r}")
        lines, written = self.service.stats(png)
        return {"lines": lines, "png": written}

    def snapshot(self, body) -> dict:
        (name,) = fields(body, ("name",), {})
        return {"path": str(self.service.snapshot(name))}

    def restore(self, body) -> dict:
        (name,) = fields(body, ("name",), {})
        self.service.restore(name)
        return {"num_injections": self.service.model.num_injections}

    def undo(self, body) -> dict:
        fields(body or {}, (), {})
        self.service.undo()
        return {"num_injections": self.service.model.num_injections}

    def model_id(self) -> str:
        return Path(self.folder).resolve().name

    def models(self, _) -> dict:
        return {"object": "list", "data": [{"id": self.model_id(), "object": "model", "owned_by": "memoryllm-hf"}]}

    def chat_completions(self, body) -> dict:
        """OpenAI-style chat completion: greedy decoding only (temperature 0 or unset, n 1), not streamed."""
        optional = {"model": None, "max_tokens": None, "max_completion_tokens": None, "temperature": None, "n": 1}
        optional |= {"stream": False, "read_mode": None}
        messages, model, max_tokens, max_completion, temperature, n, stream, read_mode = fields(
            body, ("messages",), optional
        )
        if model not in (None, self.model_id()):
            raise RequestError(f"this server holds model {self.model_id()!r}, not {model!r}", HTTPStatus.NOT_FOUND)
        if stream:
            raise RequestError("stream=true is not supported: ask without streaming")
        if temperature not in (None, 0, 0.0) or n != 1:
            raise RequestError("only greedy decoding is served: leave temperature unset (or 0) and n at 1")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise RequestError('messages must be a non-empty list of {"role": ..., "content": "text"}')
        limit = positive(max_completion if max_completion is not None else max_tokens, "max_tokens") or 128
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        answer = self.service.chat(turns, limit, checked_read_mode(read_mode))
        return {
            "id": f"chatcmpl-{secrets.token_hex(8)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id(),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        }

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # quiet: one line per request would flood a terminal
                pass

            def do_GET(self):
                self.respond("GET")

            def do_POST(self):
                self.respond("POST")

            def respond(self, method: str) -> None:
                try:
                    if self.path == "/health":
                        status, payload = HTTPStatus.OK, server.health()
                    else:
                        self.authorize()
                        status, payload = HTTPStatus.OK, server.call(method, self.path, self.body(method))
                except RequestError as err:
                    status, payload = err.status, error(err, "invalid_request_error")
                except (ValueError, KeyError, OSError, RuntimeError, SafetensorError) as err:
                    # bad input the model refused (nothing changed), or a save that failed (memory kept as it was)
                    status, payload = HTTPStatus.UNPROCESSABLE_ENTITY, error(err, type(err).__name__)
                except Exception as err:  # a bug: answered, not a dropped connection (the memory is as last saved)
                    status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, error(err, type(err).__name__)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorize(self) -> None:
                if not secrets.compare_digest(self.headers.get("Authorization", ""), f"Bearer {server.token}"):
                    raise RequestError(
                        f"send 'Authorization: Bearer TOKEN' with the token in {server.file}", HTTPStatus.UNAUTHORIZED
                    )

            def body(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise RequestError(f"request larger than {MAX_BODY_BYTES >> 20} MiB: split the text")
                raw = self.rfile.read(length) if length else b""
                if not raw:
                    return {} if method == "GET" else None
                try:
                    return json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise RequestError(f"the request body is not JSON: {err}") from None

        return Handler

    def health(self) -> dict:
        service = self.service
        return {
            "pid": os.getpid(),
            "folder": os.path.realpath(self.folder),
            "num_injections": None if service is None else service.model.num_injections,
        }


def error(err: Exception, kind: str) -> dict:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return {"error": {"message": message, "type": kind}}


def _serve(args: argparse.Namespace) -> int:
    running = running_server(args.folder)
    if running is not None:
        raise OSError(f"{args.folder} is already served by pid {running.pid} at {running.url}")
    server = MemoryServer(args.folder, port=args.port, read_mode=args.read_mode)
    url = server.start()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: server.stop())
    print(f"serving {args.folder} at {url} (pid {os.getpid()}); Ctrl-C stops", flush=True)
    server.serve_forever()
    print("stopped", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="keep a folder's model loaded and answer on 127.0.0.1 (ask, inject and stats then go through it)",
    )
    serve.add_argument("folder", help="MemoryLlama folder (its lock is held while the server runs)")
    serve.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free port)")
    serve.add_argument(
        "--read-mode",
        choices=READ_MODE_CHOICES,
        metavar="MODE",
        help="override the folder's read mode (%(choices)s; each question may override it too)",
    )
    serve.set_defaults(func=_serve)

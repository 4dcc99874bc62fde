"""Answers from a MemoryLlama (chat template when the tokenizer has one, greedy) and the `chat` REPL."""

import sys
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from .folder import folder_config, memory_report, save_memory
from .greedy import reply
from .modeling import MemoryChangedOnDiskError
from .service import bring_back_snapshot, snapshot_file, take_snapshot

HISTORY_TURNS = 8
HELP = """Plain lines are chat turns. Commands:
  /remember TEXT   write TEXT into the memory
  /forget          empty the memory and the conversation
  /undo            take back the last /remember or /forget
  /snapshot NAME   keep the current memory as NAME (also saved as FOLDER/snapshots/NAME.safetensors)
  /restore NAME    bring back snapshot NAME
  /stats           describe the memory
  /save [force]    save the memory into FOLDER (force: even over a memory another process saved meanwhile)
  /help            this text
  /quit            leave (so does Ctrl-D); Ctrl-C cancels an answer or a /remember"""


class ChatSession:
    """One `memoryllm-hf chat` session on a loaded folder; `handle(line)` runs one line of input."""

    def __init__(self, folder: str, model, tokenizer, max_new_tokens: int = 128, autosave: bool = False):
        self.folder, self.model, self.tokenizer = Path(folder), model, tokenizer
        self.max_new_tokens, self.autosave = max_new_tokens, autosave
        self.history: list[dict[str, str]] = []
        # what /undo takes back, newest last: the history length at a /remember (/undo also drops the turns that
        # could have read the undone text), or (memory, history) before a /forget (bringing that memory back
        # replaces the memory: the /remembers before the /forget cannot be undone after it)
        self.undo_marks: list[int | tuple] = []
        self.unsaved = False
        self.commands: dict[str, Callable[[str], None]] = {
            "remember": self.remember,
            "forget": self.forget,
            "undo": self.undo,
            "snapshot": self.snapshot,
            "restore": self.restore,
            "stats": self.stats,
            "save": self.save,
            "help": self.help,
        }

    def say(self, text: str) -> None:
        print(text, flush=True)

    def run(self, read_line: Callable[[str], str] = input) -> None:
        """Read lines until /quit or end of input; a failing line reports its error and changes nothing; Ctrl-C
        cancels the running answer or /remember (or, at the prompt, only the line) and the session goes on."""
        prompt = "> " if sys.stdin.isatty() else ""
        self.say(f"memory chat on {self.folder} ({self.model.num_filled_slots} slots filled); /help lists commands")
        while True:
            try:
                line = read_line(prompt)
            except EOFError:
                break
            except KeyboardInterrupt:
                self.say("(Ctrl-C: /quit or Ctrl-D leaves)")
                continue
            if not self.handle(line):
                break
        if self.unsaved:
            self.say(
                "warning: memory changes of this session were not saved (use /save next time, or chat --autosave)"
            )

    def handle(self, line: str) -> bool:
        """Run one line; False means the session ends."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.turn(line)
            return True
        name, _, argument = line[1:].partition(" ")
        if name in ("quit", "exit"):
            return False
        command = self.commands.get(name)
        if command is None:
            self.say(f"unknown command /{name}; /help lists commands")
            return True
        try:
            command(argument.strip())
        except KeyboardInterrupt:
            self.say(f"/{name} cancelled; the memory is as it was before it")
        except (ValueError, KeyError, OSError, RuntimeError, SafetensorError) as err:
            self.say(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
        return True

    def turn(self, text: str) -> None:
        messages = [*self.history[-2 * HISTORY_TURNS + 2 :], {"role": "user", "content": text}]
        try:
            answer = reply(self.model, self.tokenizer, messages, self.max_new_tokens)
        except KeyboardInterrupt:
            self.say("(answer cancelled)")
            return
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        self.say(answer)

    def changed(self) -> None:
        self.unsaved = True
        if self.autosave:
            self.store()

    def store(self, force: bool = False) -> bool:
        """Save the memory into the folder; a failure is reported and the memory stays in the session."""
        try:
            save_memory(self.folder, self.model, overwrite=force)
        except MemoryChangedOnDiskError as err:
            self.say(f"not saved: {err}. This session keeps its memory; `/save force` overwrites the folder's")
            return False
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            self.say(f"not saved ({type(err).__name__}: {err}); this session keeps its memory: fix it and /save")
            return False
        self.unsaved = False
        return True

    def remember(self, text: str) -> None:
        if not text:
            raise ValueError("usage: /remember TEXT")
        updates = self.model.inject(text, tokenizer=self.tokenizer)
        self.undo_marks.append(len(self.history))
        self.changed()
        self.say(f"remembered ({updates} memory update{'s' * (updates != 1)}, {self.model.num_injections} in total)")

    def forget(self, _: str) -> None:
        forgotten = (self.model.memory_state(), list(self.history))
        self.model.reset_memory()
        self.history.clear()
        self.undo_marks[:] = [forgotten]
        self.changed()
        self.say("memory and conversation cleared (/undo brings them back)")

    def undo(self, _: str) -> None:
        if self.undo_marks and isinstance(self.undo_marks[-1], tuple):
            state, self.history[:] = self.undo_marks.pop()
            self.model.set_memory_state(state)
            self.changed()
            self.say(f"took back the /forget ({self.model.num_injections} injections in memory, conversation back)")
            return
        self.model.undo()
        dropped = 0
        if self.undo_marks:
            mark = self.undo_marks.pop()
            dropped, self.history[mark:] = len(self.history) - mark, []
        self.changed()
        self.say(
            f"took back the last /remember ({self.model.num_injections} injections in memory) and the "
            f"{dropped // 2} conversation turn{'s' * (dropped // 2 != 1)} since"
        )

    @staticmethod
    def checked_name(name: str) -> str:
        try:
            snapshot_file(".", name)
        except ValueError:
            raise ValueError("usage: /snapshot NAME (letters, digits, '_', '-', '.')") from None
        return name

    def snapshot(self, name: str) -> None:
        path = take_snapshot(self.model, self.folder, self.checked_name(name))
        self.say(f"snapshot {name!r} saved to {path}")

    def restore(self, name: str) -> None:
        bring_back_snapshot(self.model, self.folder, self.checked_name(name))
        self.changed()
        self.say(f"restored snapshot {name!r} ({self.model.num_injections} injections)")

    def stats(self, _: str) -> None:
        self.say("\n".join(memory_report(self.model.memory_state(), folder_config(self.folder), self.folder)))

    def save(self, argument: str) -> None:
        if argument not in ("", "force"):
            raise ValueError("usage: /save [force]")
        if self.store(force=argument == "force"):
            self.say(f"memory saved to {self.folder}")

    def help(self, _: str) -> None:
        self.say(HELP)

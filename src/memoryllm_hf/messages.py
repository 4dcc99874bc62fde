"""What the folder commands print, made from plain values: the client prints a server's answers with the same
functions as the in-process commands (and without importing torch, so a question to a server costs no import)."""

import os


def inject_message(result: dict, folder: str | os.PathLike) -> str:
    """The line `memoryllm-hf inject` prints for a `FolderService.inject` result."""
    updates = result["updates"]
    return (
        f"{updates} memory update{'s' * (updates != 1)} ({result['num_injections']} in total); "
        f"{result['replaced']} of {result['filled_before']} stored slots per layer replaced; "
        f"{result['filled']}/{result['num_slots']} slots filled; memory saved to {folder}"
    )


def stats_text(folder: str | os.PathLike, lines: list[str], png: str | os.PathLike | None = None) -> str:
    """What `memoryllm-hf stats` prints for the lines of `memory_report` (and the PNG it wrote, if any)."""
    text = "\n".join([f"memory of {folder}"] + ["  " + line for line in lines])
    return text + (f"\nslot norm histogram written to {png}" if png else "")

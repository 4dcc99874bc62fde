"""Registering MemoryLlama with transformers' Auto classes and with PEFT's default LoRA targets.

`import memoryllm_hf` must stay cheap (the command line answers `--help` without torch), so nothing here imports
transformers or PEFT: a library already imported is registered at once, one imported later right after its import.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


def register_transformers() -> None:
    """`AutoConfig` / `AutoModelForCausalLM` / `AutoModel` find MemoryLlama without `trust_remote_code`: importing
    `memoryllm_hf.modeling` registers them (if it is being imported right now, it registers when it finishes)."""
    if f"{__package__}.modeling" not in sys.modules:
        importlib.import_module(f"{__package__}.modeling")


def register_peft() -> None:
    """PEFT's per-model-type defaults (`LoraConfig(task_type="CAUSAL_LM")` without `target_modules`, and the other
    tuners' tables) treat `memory_llama` as the Llama it is."""
    from peft.utils import constants

    for name, table in vars(constants).items():
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict) and "llama" in table:
            table.setdefault("memory_llama", table["llama"])


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback` once, right after the module `name` has been imported (then steps out of the way)."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        # A look-up that does not import (transformers' `importlib.util.find_spec("peft")` availability checks) must
        # not use the hook up: the finder steps out only once the module has really been executed.
        if fullname != self.name or self.__dict__.get("_finding"):
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback, finder = spec.loader.exec_module, self.callback, self

        def exec_then_register(module):
            exec_module(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            callback()

        spec.loader.exec_module = exec_then_register
        return spec


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """`callback()` now if `name` is imported, otherwise right after its first import."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))

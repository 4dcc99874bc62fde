"""Package structure: no import cycles between the package's modules (imports inside functions included), and the
command line's `--help` stays free of torch."""

import ast
import subprocess
import sys
from pathlib import Path

import memoryllm_hf

PACKAGE = Path(memoryllm_hf.__file__).parent


def module_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its source (`memoryllm_hf.modeling` is remote code and
    excluded: it never imports the package)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "modeling" in parts:
            continue
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = module_graph()
    assert "memoryllm_hf.loading" in graph and graph["memoryllm_hf.training.model"]
    assert cycles(graph) == []


def test_cycle_detection_works():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_help_does_not_import_torch():
    code = "import sys; from memoryllm_hf.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_peft_defaults_survive_an_availability_check_before_peft_is_imported():
    """transformers looks PEFT up with importlib.util.find_spec (no import) before anyone imports it; the LoRA
    defaults for memory_llama must still be registered when PEFT is imported afterwards."""
    code = (
        "import importlib.util, memoryllm_hf; importlib.util.find_spec('peft'); import peft.utils.constants as c; "
        "print('memory_llama' in c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"

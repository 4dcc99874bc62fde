"""Package structure: no import cycles between the package's modules (imports inside functions included), and the
command line's `--help` stays free of torch."""

import ast
import importlib.util
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


# ---------------------------------------------------------------------------------------------- modeling/ boundary
MODELING = Path(importlib.util.find_spec("memoryllm_hf.modeling").origin).parent  # found, not imported
MODEL_FILE_BUDGET = 350  # lines of modeling_memory_llama.py: the model class only wires parts


def modeling_files() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(MODELING.glob("*.py"))}


def modeling_graph() -> dict[str, set[str]]:
    """modeling file -> sibling files it imports (relative imports, inside functions too)."""
    files = modeling_files()
    graph = {}
    for name, tree in files.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module)
                else:
                    deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycles_inside_modeling():
    graph = modeling_graph()
    assert "memory_reads" in graph["modeling_memory_llama"]
    assert cycles(graph) == []


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def defined_names(tree: ast.Module) -> set[str]:
    """Functions, classes, methods and assigned attributes a file defines (its own private names)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def private_cross_file_uses(files: dict[str, ast.Module]) -> list[str]:
    """Private names (`_x`) a modeling file calls or imports that it does not define itself and that another
    modeling file defines (transformers' / torch's own private names are not this package's boundary)."""
    defined = {name: defined_names(tree) for name, tree in files.items()}
    found = []
    for name, tree in files.items():
        elsewhere = set().union(*(names for other, names in defined.items() if other != name)) - defined[name]
        called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found += [f"{name}: imports {a.name}" for a in node.names if is_private(a.name)]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                attr = node.func.attr
                if is_private(attr) and attr in elsewhere:
                    found.append(f"{name}:{node.lineno}: calls .{attr}()")
            elif isinstance(node, ast.Attribute) and id(node) not in called and is_private(node.attr) and (
                node.attr in elsewhere
            ):
                found.append(f"{name}:{node.lineno}: uses .{node.attr}")
    return found


def test_no_private_cross_file_calls_inside_modeling():
    assert private_cross_file_uses(modeling_files()) == []


def test_the_private_call_check_finds_one():
    files = {
        "a": ast.parse("class A:\n    def _helper(self):\n        return 1\n"),
        "b": ast.parse("from .a import A\n\ndef use(model):\n    return model._helper()\n"),
        "c": ast.parse("def fine(module):\n    return module._version, module._own()\n\ndef _own():\n    pass\n"),
    }
    assert private_cross_file_uses(files) == ["b:4: calls ._helper()"]


def src_imports_of_modeling() -> list[tuple[str, str, str]]:
    """(src file, imported module, name) of every import of `memoryllm_hf.modeling` in src/ (the remote code is
    excluded: it is modeling itself)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if MODELING in path.parents:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{module}.{alias.name}"
                    if module.startswith("memoryllm_hf.modeling") or target.startswith("memoryllm_hf.modeling."):
                        found.append((str(path.relative_to(PACKAGE)), module, alias.name))
            elif isinstance(node, ast.Import):
                found += [(str(path.relative_to(PACKAGE)), a.name, "") for a in node.names
                          if a.name.startswith("memoryllm_hf.modeling")]
    return found


def test_src_imports_only_public_names_of_modeling():
    from memoryllm_hf import modeling

    imports = src_imports_of_modeling()
    assert len(imports) > 10
    bad = [i for i in imports if i[1] != "memoryllm_hf.modeling" or i[2] not in modeling.__all__]
    assert bad == []


def test_the_model_file_stays_within_its_line_budget():
    lines = (MODELING / "modeling_memory_llama.py").read_text().count("\n")
    assert lines <= MODEL_FILE_BUDGET, f"modeling_memory_llama.py has {lines} lines: move a part out, wire it in"


def test_every_modeling_file_says_what_it_holds():
    for name, tree in modeling_files().items():
        doc = ast.get_docstring(tree)
        assert doc and len(doc.splitlines()[0]) > 20, f"modeling/{name}.py needs a first docstring line"


def test_mixins_keep_only_public_methods():
    """The model's mixins are its public API; what they need privately lives in module functions or declared parts."""
    private = [
        f"{name}.{cls.name}.{node.name}"
        for name, tree in modeling_files().items()
        for cls in tree.body
        if isinstance(cls, ast.ClassDef) and cls.name.endswith("Mixin")
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and is_private(node.name)
    ]
    assert private == []

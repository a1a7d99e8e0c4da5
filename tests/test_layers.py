"""The layer rule of DESIGN.md, checked on the source: each layer imports only the layers below it.

Every import statement of every module under ``src/furiosa_llm``, ``hal/`` and ``sim/`` is read
with ``ast`` (imports inside functions and ``if TYPE_CHECKING:`` blocks count too) and checked
against ``MAY_IMPORT``. Layers, top to bottom: entrypoints > api > core > hal; ``model`` is the
torch model code, used by ``api`` and by the torch backend (``hal/torch_backend.py``); ``sim``
sits beside ``entrypoints`` and drives api, core and hal (``model`` only for functional runs,
imported lazily, so ``import furiosa_llm.sim`` loads no torch model code).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# where each package's source lives (pyproject.toml maps hal/ and sim/ with package-dir)
PACKAGE_DIRS = {
    "furiosa_llm": REPO / "src" / "furiosa_llm",
    "furiosa_llm.hal": REPO / "hal",
    "furiosa_llm.sim": REPO / "sim",
}

# layer -> the project layers its modules may import (their own included)
MAY_IMPORT: dict[str, set[str]] = {
    "entrypoints": {"entrypoints", "sim", "api", "core", "model", "hal"},
    "sim": {"sim", "api", "core", "model", "hal"},
    "api": {"api", "core", "model", "hal"},
    "core": {"core", "hal"},
    "model": {"model", "hal"},
    "hal": {"hal"},
}
# single files allowed more than their layer: the torch backend wires the model into the HAL queue
FILE_EXCEPTIONS: dict[str, set[str]] = {
    "hal/torch_backend.py": {"model"},
}
# layers that must only import these project layers lazily (inside a function), never at module level
LAZY_ONLY: dict[str, set[str]] = {
    "sim": {"model"},
}
# third-party or standard modules a layer must not import at all (core is torch-free and clocked from outside)
FORBIDDEN_EXTERNAL: dict[str, set[str]] = {
    "core": {"torch", "transformers", "asyncio"},
}
# the directions DESIGN.md and issue 10 name; the table above must forbid at least these
REQUIRED_FORBIDDEN = {
    "core": {"api", "entrypoints", "sim", "model"},
    "hal": {"api", "core", "entrypoints", "sim", "model"},
    "model": {"api", "core", "entrypoints", "sim"},
    "api": {"entrypoints", "sim"},
}


# Furiosa-LLM's public module paths: thin re-exports of the api layer (``furiosa_llm.outputs`` ...)
FACADE_MODULES = {"outputs", "sampling_params", "llm_engine"}


def layer_of(module: str) -> str | None:
    """The layer of a ``furiosa_llm`` module; None for a module outside the project.

    The top package ``furiosa_llm`` is the facade that re-exports the API, so it counts as ``api``,
    and so do the re-export modules of ``FACADE_MODULES``.
    """
    parts = module.split(".")
    if parts[0] != "furiosa_llm":
        return None
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in FACADE_MODULES):
        return "api"
    if parts[1] in MAY_IMPORT:
        return parts[1]
    raise AssertionError(f"module {module} is in no layer of DESIGN.md; add its layer to MAY_IMPORT")


def module_of(path: Path) -> tuple[str, bool]:
    """``(dotted module name, is a package __init__)`` of a source file."""
    for pkg, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if path.is_relative_to(folder):
            rel = path.relative_to(folder).with_suffix("")
            parts = [*pkg.split("."), *rel.parts]
            if parts[-1] == "__init__":
                return ".".join(parts[:-1]), True
            return ".".join(parts), False
    raise AssertionError(f"{path} is in no package")


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, bool]]:
    """``(line, imported module, at module level)`` for every import in ``tree``, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    top_level = {id(n) for n in getattr(tree, "body", [])}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                if base == "furiosa_llm":  # `from furiosa_llm import core` is the subpackage, not the facade
                    target = f"{base}.{a.name}" if a.name in MAY_IMPORT else base
                else:
                    target = f"{base}.{a.name}" if node.level and not node.module else base
                found.append((node.lineno, target, id(node) in top_level))
    return found


def violations_in(source: str, module: str, rel_path: str, is_package: bool = False) -> list[str]:
    """Every import of one module that breaks the layer rule, as ``path:line: message``."""
    layer = layer_of(module)
    allowed = MAY_IMPORT[layer] | FILE_EXCEPTIONS.get(rel_path, set())
    bad = []
    for line, target, module_level in imports(ast.parse(source), module, is_package):
        where = f"{rel_path}:{line}"
        top = target.split(".")[0]
        if top in FORBIDDEN_EXTERNAL.get(layer, set()):
            bad.append(f"{where}: {layer} imports {target} (forbidden in {layer})")
            continue
        to = layer_of(target)
        if to is None:
            continue
        if to not in allowed:
            bad.append(f"{where}: {layer} imports {target} ({to}); {layer} may import only {sorted(allowed)}")
        elif module_level and to in LAZY_ONLY.get(layer, set()) and rel_path not in FILE_EXCEPTIONS:
            bad.append(f"{where}: {layer} imports {target} ({to}) at module level; only inside a function")
    return bad


def source_files() -> list[Path]:
    files = []
    for pkg, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            inner = path.relative_to(folder).parts
            if pkg == "furiosa_llm" and inner[0] in ("hal", "sim"):
                continue  # not there; the mapped folders are walked on their own
            files.append(path)
    return files


def test_the_rule_table_forbids_what_design_md_forbids():
    for layer, forbidden in REQUIRED_FORBIDDEN.items():
        assert not MAY_IMPORT[layer] & forbidden, f"{layer} may import {MAY_IMPORT[layer] & forbidden}"
    for layer, allowed in MAY_IMPORT.items():  # downward only: nothing imports entrypoints or sim but them
        assert "entrypoints" not in allowed or layer == "entrypoints"
        assert "sim" not in allowed or layer in ("sim", "entrypoints")
    assert FORBIDDEN_EXTERNAL["core"] >= {"torch", "asyncio"}


def test_every_import_follows_the_layer_rule():
    files = source_files()
    assert len(files) > 30 and {f.name for f in files} >= {"scheduler.py", "api_server.py", "simulation.py", "queue.py"}
    bad = []
    for path in files:
        module, is_package = module_of(path)
        bad += violations_in(path.read_text(), module, str(path.relative_to(REPO)), is_package)
    assert not bad, "imports against DESIGN.md's layer rule:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,path,source", [
    ("furiosa_llm.core.scheduler", "src/furiosa_llm/core/scheduler.py", "import torch"),
    ("furiosa_llm.core.scheduler", "src/furiosa_llm/core/scheduler.py", "def f():\n    import asyncio"),
    ("furiosa_llm.core.scheduler", "src/furiosa_llm/core/scheduler.py", "from furiosa_llm.api.outputs import Logprob"),
    ("furiosa_llm.core.scheduler", "src/furiosa_llm/core/scheduler.py", "from ..model import runner"),
    ("furiosa_llm.core.scheduler", "src/furiosa_llm/core/scheduler.py", "from furiosa_llm import SamplingParams"),
    ("furiosa_llm.core.scheduler", "src/furiosa_llm/core/scheduler.py", "import furiosa_llm.sim"),
    ("furiosa_llm.hal.queue", "hal/queue.py", "from furiosa_llm.core import Request"),
    ("furiosa_llm.hal.queue", "hal/queue.py", "def f():\n    from furiosa_llm.model.runner import ModelRunner"),
    ("furiosa_llm.hal.torch_backend", "hal/torch_backend.py", "from furiosa_llm.api import outputs"),
    ("furiosa_llm.model.runner", "src/furiosa_llm/model/runner.py", "from furiosa_llm.core import Scheduler"),
    ("furiosa_llm.api.llm", "src/furiosa_llm/api/llm.py", "from ..entrypoints import cli"),
    ("furiosa_llm.api.llm", "src/furiosa_llm/api/llm.py", "from furiosa_llm import sim"),
    ("furiosa_llm.sim.simulation", "sim/simulation.py", "from furiosa_llm.entrypoints import cli"),
    ("furiosa_llm.sim.simulation", "sim/simulation.py", "from furiosa_llm.model.runner import ModelRunner"),
])
def test_a_planted_forbidden_import_is_found(module, path, source):
    assert violations_in(source, module, path), source


@pytest.mark.parametrize("module,path,source", [
    ("furiosa_llm.core.scheduler", "src/furiosa_llm/core/scheduler.py", "from furiosa_llm.hal import Batch\nfrom . import jit"),
    ("furiosa_llm.hal.torch_backend", "hal/torch_backend.py", "from furiosa_llm.model.runner import ModelRunner"),
    ("furiosa_llm.api.llm", "src/furiosa_llm/api/llm.py", "from furiosa_llm.core import EngineCore\nimport asyncio"),
    ("furiosa_llm.sim.real", "sim/real.py", "def f():\n    from furiosa_llm.model.runner import ModelRunner"),
    ("furiosa_llm.entrypoints.cli", "src/furiosa_llm/entrypoints/cli.py", "from furiosa_llm.sim import simulate"),
])
def test_allowed_imports_pass(module, path, source):
    assert not violations_in(source, module, path)


def test_core_and_hal_import_no_torch():
    code = "import sys, furiosa_llm, furiosa_llm.core, furiosa_llm.hal; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_furiosa_llm_is_cheap():
    code = (
        "import sys, furiosa_llm; from furiosa_llm import SamplingParams, EngineArgs; "
        "import furiosa_llm.api, furiosa_llm.outputs, furiosa_llm.sampling_params, furiosa_llm.llm_engine; "
        "from furiosa_llm.api import SchedulerConfig; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

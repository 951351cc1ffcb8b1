"""The layout holds by tool, not by promise: layers, no cycles, few levels, a torch-free
package import, and the three files that say how one tensor is merged."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_PACKAGE_LEVELS = 7


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("lora_tools", include_external_packages=False)


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_import_linter_contracts_are_kept() -> None:
    res = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                          "lint_imports_command()"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "0 broken" in res.stdout


def test_no_import_cycles_type_checking_ones_included(graph: grimp.ImportGraph) -> None:
    # grimp records every import statement, those under TYPE_CHECKING and in functions too.
    for module in graph.modules:
        for dep in graph.find_modules_directly_imported_by(module):
            if module == "lora_tools":
                continue  # the API re-exports; nothing below imports the package itself
            assert not graph.chain_exists(importer=dep, imported=module), (module, dep)


def test_at_most_seven_package_levels(graph: grimp.ImportGraph) -> None:
    deps: dict[str, set[str]] = {}
    for module in graph.modules:
        for dep in graph.find_modules_directly_imported_by(module):
            if _package(module) != _package(dep) and module != "lora_tools":
                deps.setdefault(_package(module), set()).add(_package(dep))

    @functools.cache
    def level(pkg: str) -> int:
        return 1 + max((level(d) for d in deps.get(pkg, ())), default=0)

    assert max(level(p) for p in deps) <= MAX_PACKAGE_LEVELS


def test_one_tensor_is_merged_in_three_files(graph: grimp.ImportGraph) -> None:
    """kernel (sum, round once) -> modules.lora (ΔW of a module, through the module-type
    registry that also holds LoHa/LoKr/full) -> math.deltas (formula)."""
    kernel = graph.find_modules_directly_imported_by("lora_tools.merging.kernel")
    assert "lora_tools.modules.registry" in kernel
    assert "lora_tools.modules.lora" in graph.find_modules_directly_imported_by(
        "lora_tools.modules.registry")
    assert "lora_tools.math.deltas" in graph.find_modules_directly_imported_by(
        "lora_tools.modules.lora")
    assert not graph.find_modules_directly_imported_by("lora_tools.math.deltas")


def test_package_import_is_torch_free_and_the_api_resolves() -> None:
    code = ("import sys, lora_tools; assert 'torch' not in sys.modules; "
            "names = [n for n in lora_tools.__all__ if n not in ('__version__',)]; "
            "assert all(callable(getattr(lora_tools, n)) for n in names); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]


def test_the_public_api_is_held_to_mypy_strict() -> None:
    """Every module the API takes a name from has --strict's flags in pyproject.toml."""
    import lora_tools

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    overrides = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["overrides"]
    strict = next(o for o in overrides if o.get("disallow_untyped_calls"))
    assert all(strict.get(flag) for flag in (
        "disallow_any_generics", "disallow_untyped_defs", "disallow_incomplete_defs",
        "check_untyped_defs", "warn_return_any", "no_implicit_reexport", "strict_equality"))
    public = {"lora_tools", "lora_tools.errors"} | {m for m, _ in lora_tools._LAZY.values()}
    assert public <= set(strict["module"]), sorted(public - set(strict["module"]))


def test_the_layer_picture_in_docs_is_current() -> None:
    """docs/architecture.md's picture and figures are what docs/layers.py draws now."""
    pytest.importorskip("tomllib")  # Python 3.11+
    res = subprocess.run([sys.executable, "docs/layers.py", "--check"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, "run: python docs/layers.py\n" + res.stderr[-2000:]

"""Imports flow one way between the project's packages, and methods see only the public contract.

Every import counts, the ones inside functions included: a lazy import that goes against the layers is
still a cycle, only one that fails later.
"""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each package may import only packages listed before it (the root package is the public API, last)
LAYERS = [
    "orchestrator.errors",
    "orchestrator.config",
    "orchestrator.registry",
    "methods",
    "orchestrator.data",
    "orchestrator.storage",
    "orchestrator.evaluation",
    "orchestrator.reporting",
    "orchestrator.engine",
    "orchestrator.tuning",
    "orchestrator.cli",
    "orchestrator._internal",
    "orchestrator",
]
METHOD_CONTRACT = {"orchestrator.errors", "orchestrator.config", "orchestrator.registry"}


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "methods":
        return "methods"
    return "orchestrator" if len(parts) == 1 else ".".join(parts[:2])


def modules() -> dict[str, Path]:
    found = {}
    for top in ("orchestrator", "methods"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(source: str) -> list[str]:
    """Every module a source imports, wherever the import statement stands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def package_edges() -> dict[tuple[str, str], set[str]]:
    """(importing package, imported package) -> the importing modules."""
    edges = defaultdict(set)
    for name, path in modules().items():
        for target in imports_of(path.read_text()):
            if target.split(".")[0] in ("orchestrator", "methods"):
                a, b = package_of(name), package_of(target)
                if a != b:
                    edges[(a, b)].add(name)
    return edges


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in modules()}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to LAYERS"


def test_imports_flow_one_way():
    rank = {p: i for i, p in enumerate(LAYERS)}
    upward = [f"{a} -> {b} (in {', '.join(sorted(mods))})" for (a, b), mods in package_edges().items()
              if rank[b] > rank[a]]
    assert not upward, "imports against the layers (cycles waiting to happen):\n" + "\n".join(sorted(upward))


def test_methods_depend_only_on_the_public_contract():
    outside = [f"{b} (in {', '.join(sorted(mods))})" for (a, b), mods in package_edges().items()
               if a == "methods" and b not in METHOD_CONTRACT]
    assert not outside, "methods/ reaches past its contract:\n" + "\n".join(sorted(outside))


def test_the_check_sees_lazy_imports():
    """An import inside a function (the usual way a cycle hides) counts like one at the top."""
    source = "import torch\n\ndef f():\n    from orchestrator.engine import driver\n    import methods.bct\n"
    assert imports_of(source) == ["torch", "orchestrator.engine", "methods.bct"]


def test_one_registry_type_serves_every_kind():
    from methods.base import METHODS
    from methods.crossmodal_base import CROSSMODAL_METHODS
    from methods.nets.backbones import BACKBONES
    from orchestrator.data import DATASETS
    from orchestrator.registry import Registry
    from orchestrator.tuning.sweep import SEARCH_ALGORITHMS

    for registry in (METHODS, CROSSMODAL_METHODS, BACKBONES, DATASETS, SEARCH_ALGORITHMS):
        assert isinstance(registry, Registry) and registry.names()
    assert {"bct", "oca", "stationary"} <= set(METHODS.names()) and "xbt" in CROSSMODAL_METHODS


def test_a_registry_names_the_key_and_the_choices_and_refuses_a_second_entry():
    import pytest

    from orchestrator.errors import ConfigError
    from orchestrator.registry import Registry

    registry = Registry("widget", "widgets.name")
    registry.add("a", 1)
    registry.register("b")(2)
    assert registry.get("b") == 2 and registry.names() == ["a", "b"]
    with pytest.raises(ConfigError) as err:
        registry.get("c", "x.0.name")
    assert err.value.key == "x.0.name" and "unknown widget 'c'; available: a, b" in str(err.value)
    with pytest.raises(TypeError, match="already registered"):
        registry.add("a", 3)

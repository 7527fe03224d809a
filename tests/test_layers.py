"""The layering of docs/ARCHITECTURE.md, held over every import in the tree (also imports inside functions).

Bottom to top: tagml.core -> features -> training -> scoring -> monitoring -> compliance -> serving -> orchestration -> cli. A module
imports only from its own package and the layers below; only orchestration imports Dagster.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "features", "training", "scoring", "monitoring", "compliance", "serving", "orchestration", "cli")
# the layers whose code lives in tagml/<name>/; the others are top-level folders installed as tagml.<folder>
IN_TAGML = ("core", "compliance", "serving", "cli")
FOLDERS = {name: (ROOT / "tagml" / name if name in IN_TAGML else ROOT / name) for name in LAYERS}
GENERIC = {name for name in LAYERS if name not in IN_TAGML}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tagml" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _modules(layer: str) -> list[Path]:
    return sorted(FOLDERS[layer].rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_each_package_imports_only_from_the_layers_below(layer):
    rank = LAYERS.index(layer)
    wrong = []
    for path in _modules(layer):
        for line, module in _imports(path):
            target = _layer_of(module)
            if module.split(".")[0] in GENERIC:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} outside the tagml namespace")
            elif target is not None and LAYERS.index(target) > rank:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} (layer {target} is above {layer})")
            elif module.split(".")[0] == "dagster" and layer != "orchestration":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports dagster (only orchestration may)")
    assert not wrong, "\n".join(wrong)


def test_the_root_package_imports_nothing_of_its_own():
    assert not [m for _, m in _imports(ROOT / "tagml" / "__init__.py") if m.startswith("tagml")]


def test_the_checker_sees_a_wrong_import(tmp_path):
    # the rule above must be able to fail: a scoring module importing monitoring is caught
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tagml.monitoring.drift import compute_drift\n")
    [(line, module)] = _imports(bad)
    assert (line, _layer_of(module)) == (2, "monitoring") and LAYERS.index("monitoring") > LAYERS.index("scoring")

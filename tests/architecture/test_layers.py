"""The package's layers and the one direction their imports may point.

Every module of `funmatch/`, `components/` and `pipelines/` is parsed (not imported) and each of its
imports, function-level ones included, is checked against the layer table below: a module may import
its own layer and the layers beneath it, never one above. The KFP SDK is the adapters' business: the
core (everything below `components`) never imports kfp. Loading a config, listing presets, compiling
and submitting import no torch.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A module belongs to the longest prefix that names it.
LAYERS: list[tuple[str, ...]] = [
    ("funmatch", "funmatch.errors"),
    ("funmatch.config",),
    ("funmatch.runtime", "funmatch.storage"),
    ("funmatch.recipe",),
    ("funmatch.data",),
    ("funmatch.stages",),
    ("funmatch.launch",),
    ("components",),
    ("pipelines",),
    ("funmatch.app", "funmatch.__main__"),
]
KFP_FROM = LAYERS.index(("components",))  # the lowest layer that may import kfp
FIRST_PARTY = ("funmatch", "components", "pipelines")


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming `module`."""
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    if rank < 0:
        raise KeyError(f"{module} is in no layer of tests/architecture/test_layers.py: add it to LAYERS")
    return rank


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from funmatch import config` imports funmatch.config: resolve names that are modules
            found += [(node.lineno, f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base) for a in node.names]
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def violations(root: Path) -> list[str]:
    """One line per import that points up the layers, or from the core into kfp."""
    found = []
    for top in FIRST_PARTY:
        for path in sorted((root / top).rglob("*.py")):
            module = module_name(root, path)
            rank = layer_of(module)
            for line, target in imports(path, module):
                where = f"{path.relative_to(root)}:{line}"
                head = target.split(".")[0]
                if head == "kfp" and rank < KFP_FROM:
                    found.append(f"{where}: {module} imports kfp (only components, pipelines and app may)")
                elif head in FIRST_PARTY and layer_of(target) > rank:
                    found.append(f"{where}: {module} (layer {rank}) imports {target} (layer {layer_of(target)})")
    return found


def test_imports_point_down_the_layers():
    assert violations(ROOT) == []


def test_every_module_is_in_a_layer():
    for top in FIRST_PARTY:
        for path in (ROOT / top).rglob("*.py"):
            layer_of(module_name(ROOT, path))  # raises for a module no layer names


def _copy_tree(dst: Path) -> None:
    for top in FIRST_PARTY:
        for path in (ROOT / top).rglob("*.py"):
            target = dst / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())


@pytest.mark.parametrize(
    "module, line, expected",
    [
        ("funmatch/stages/evaluate.py", "    from kfp import dsl\n", "imports kfp"),
        ("funmatch/recipe/losses.py", "from funmatch.stages import distill\n", "imports funmatch.stages.distill"),
        ("funmatch/launch/tasks.py", "    import components\n", "imports components"),
        ("funmatch/config/__init__.py", "from funmatch.app import cli\n", "imports funmatch.app.cli"),
    ],
)
def test_a_wrong_way_import_is_caught(tmp_path, module, line, expected, monkeypatch):
    """The checker is live: a copy of the tree with one bad import, at module or function level, fails."""
    _copy_tree(tmp_path)
    path = tmp_path / module
    text = path.read_text()
    if line.startswith(" "):  # inside a function body
        text += f"\n\ndef _probe() -> None:\n{line}"
    else:
        text = line + text
    path.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0] and module in found[0], found


def _imported_modules(code: str) -> set[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "from funmatch import config; config.validate(config.load('imagenet'))",
        "from funmatch.app import cli; cli.main(['presets'])",
        "import tempfile; from funmatch.app import cli; "
        "assert cli.main(['compile', '--preset', 'imagenet', '--set', 'runtime.checkpoint_dir=gs://b/c', "
        "'--output', tempfile.mkdtemp() + '/p.yaml']) == 0",
        "from funmatch.app import cli, kfp_client",
    ],
)
def test_config_presets_compile_and_submit_import_no_torch(code):
    loaded = _imported_modules(code)
    assert "kfp" in loaded or "compile" not in code
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("torch", "timm", "torchvision", "onnxruntime"))
    assert heavy == [], heavy[:5]

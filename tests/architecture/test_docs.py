"""The docs point at what exists: every repository path the README and docs/ name, and every
`FUNMATCH_*` variable the code reads is documented in the README."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOPS = ("funmatch", "components", "pipelines", "tests", "tools", "docs", "images", "manifests", r"\.github")
PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(TOPS)})/[\w./-]*\w)")


def test_every_path_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        for path in set(PATH.findall(doc.read_text())):
            path = path.split("::")[0]
            if not (ROOT / path).exists() and not any(ROOT.glob(path)):
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing


def test_the_path_check_is_live():
    assert PATH.findall("see `funmatch/nowhere.py` and tests/data/test_x.py::test_y") == [
        "funmatch/nowhere.py",
        "tests/data/test_x.py",
    ]


def test_every_environment_variable_is_documented():
    code = [p for top in ("funmatch", "components", "pipelines") for p in (ROOT / top).rglob("*.py")]
    code += [ROOT / "Makefile", *(ROOT / ".github" / "workflows").glob("*.yml")]
    used = {m for p in code for m in re.findall(r"\bFUNMATCH_[A-Z0-9_]*[A-Z0-9]\b", p.read_text())}
    table = set(
        re.findall(
            r"`(FUNMATCH_[A-Z0-9_]+)`",
            (ROOT / "README.md").read_text().split("## Environment variables")[1].split("\n## ")[0],
        )
    )
    assert {"FUNMATCH_IMAGE_PREFIX", "FUNMATCH_GCS_DEADLINE_S", "FUNMATCH_TRAINJOB_RUNTIME"} <= used
    assert sorted(used - table) == []


def test_every_dotted_name_the_docs_and_docstrings_use_resolves():
    """`funmatch.stages.distill.run` and the like, in README, docs/ and the code's own text, name a module or
    an attribute that exists (a moved module leaves no stale dotted name behind)."""
    import importlib

    texts = [*DOCS, *(p for top in ("funmatch", "components", "pipelines") for p in (ROOT / top).rglob("*.py"))]
    names = {n for p in texts for n in re.findall(r"\bfunmatch(?:\.[A-Za-z_]\w*)+", p.read_text())}
    names = {n.removesuffix(".py") for n in names} - {"funmatch.egg-info", "funmatch.dev"}
    unresolved = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            unresolved.append(name)
    assert {"funmatch.stages.distill.run", "funmatch.data.loader.Batches"} <= names
    assert unresolved == []

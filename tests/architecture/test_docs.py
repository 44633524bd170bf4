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

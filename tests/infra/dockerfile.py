"""Dockerfiles and their build context, read the way `docker build` reads them.

- parse_dockerfile: global ARGs and stages, continuations joined, comments dropped.
- dockerfile_policy_errors: funmatch's image policy (multi-stage, numeric non-root USER 1000,
  HF_HUB_OFFLINE=1, nothing built or installed in the final stage, pip pinned by constraints.txt, base
  images pinned and in step with constraints.txt).
- dockerignore_patterns / in_context: .dockerignore with Docker's matching rules.
- replay_copies: the builder stage's COPY steps replayed from what .dockerignore leaves in the context.
"""

import re
import shutil
from pathlib import Path

from .kustomize import split_image
from .paths import ROOT, constraint

Instruction = tuple[str, str]  # (INSTRUCTION, arguments)
IgnorePattern = tuple[bool, re.Pattern]  # (exclude?, regex)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[list[Instruction]]]:
    """(global ARG defaults, stages as [(INSTRUCTION, arguments)]) with continuations joined."""
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continuation are dropped by the Dockerfile parser
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[list[Instruction]] = []
    for line in logical:
        instr, _, args = line.strip().partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "FROM":
            stages.append([])
        if not stages:
            if instr == "ARG":
                name, _, default = args.partition("=")
                global_args[name] = default
            continue
        stages[-1].append((instr, args))
    return global_args, stages


def _expand(s: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)


def base_images(text: str) -> list[str]:
    """Each stage's FROM image, global ARGs substituted."""
    global_args, stages = parse_dockerfile(text)
    return [_expand(stage[0][1].split()[0], global_args) for stage in stages]


def final_user(path: Path) -> str:
    """The last USER of the Dockerfile's final stage."""
    _, stages = parse_dockerfile(path.read_text())
    users = [a for i, a in stages[-1] if i == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    return users[-1]


def _env_pairs(args: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args))


BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|cmake|build-essential|git|[\w.+-]+-dev)\b")


def dockerfile_policy_errors(text: str, kind: str) -> list[str]:
    """funmatch's policy for images/Dockerfile.<kind> (kind: cpu or cuda)."""
    errs = []
    global_args, stages = parse_dockerfile(text)
    if len(stages) < 2:
        errs.append("not multi-stage")
    images = base_images(text)
    for image in images:
        _, ref = split_image(image)
        if "$" in image or not re.search(r"\d", ref) or "latest" in ref:
            errs.append(f"base image {image!r} is not pinned to a release")
    for stage in stages:
        for instr, args in stage:
            if (
                instr == "RUN"
                and re.search(r"\bpip3? install\b", args)
                and ("-c constraints.txt" not in args or "--no-cache-dir" not in args)
            ):
                errs.append(f"pip install without -c constraints.txt / --no-cache-dir: {args[:80]}")
    final = stages[-1] if stages else []
    users = [a for i, a in final if i == "USER"]
    if not users or not re.fullmatch(r"1000(:1000)?", users[-1]):
        errs.append(f"final stage does not end as numeric USER 1000 (got {users[-1] if users else None})")
    env = {}
    for instr, args in final:
        if instr == "ENV":
            env.update(_env_pairs(args))
    if env.get("HF_HUB_OFFLINE", "").strip('"') != "1":
        errs.append("final stage does not set HF_HUB_OFFLINE=1")
    for instr, args in final:
        if instr == "RUN" and (re.search(r"\b(pip3?|apt-get|apt|conda) install\b", args) or BUILD_TOOLS.search(args)):
            errs.append(f"final stage installs or builds: {args[:80]}")
    if not any(i == "COPY" and "--from=builder" in a and "/opt/venv" in a for i, a in final):
        errs.append("final stage does not take the environment from the builder stage")
    if kind == "cpu":
        if "https://download.pytorch.org/whl/cpu" not in text:
            errs.append("CPU image does not install torch from the PyTorch CPU index")
        py = re.match(r"python:(\d+)\.(\d+)", images[0]) if images else None
        if not py or (int(py.group(1)), int(py.group(2))) < (3, 11):
            errs.append(f"CPU base {images[:1]} is not Python >= 3.11")
    else:
        if not images or not all(i.startswith("pytorch/pytorch:") and i.endswith("-runtime") for i in images):
            errs.append(f"CUDA stages are not on the official PyTorch runtime image: {images}")
        builder = stages[0] if stages else []
        if not any(i == "COPY" and a.split()[-1] == "/opt/venv/bin/torchrun" for i, a in builder):
            errs.append("the venv has no torchrun of its own: workers would start outside it")
        if global_args.get("TORCH_VERSION") != constraint("torch"):
            errs.append(
                f"TORCH_VERSION {global_args.get('TORCH_VERSION')} is not constraints.txt's torch {constraint('torch')}"
            )
    return errs


# --- the build context ----------------------------------------------------------------------------------


def dockerignore_patterns(text: str | None = None) -> list[IgnorePattern]:
    """(exclude?, regex) per .dockerignore line, Docker's rules: `*` and `?` stay within a path segment,
    `**` spans segments, a pattern also matches everything under a matched directory, last match wins."""
    out = []
    for line in (text if text is not None else (ROOT / ".dockerignore").read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx, i = rx + pat[i : j + 1], j + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        out.append((not negate, re.compile(rx + "(/.*)?")))
    return out


def in_context(rel: str, patterns: list[IgnorePattern]) -> bool:
    """Whether the repository path `rel` reaches the Docker daemon under these patterns."""
    excluded = False
    for exclude, rx in patterns:
        if rx.fullmatch(rel):
            excluded = exclude
    return not excluded


def replay_copies(dockerfile: Path, dest: Path, patterns: list[IgnorePattern] | None = None) -> Path:
    """The builder stage's COPY steps, from the context .dockerignore leaves, into dest (as its /):
    returns the directory `pip install .` runs in. A source with nothing left in the context fails, as
    `docker build` does."""
    patterns = dockerignore_patterns() if patterns is None else patterns
    _, stages = parse_dockerfile(dockerfile.read_text())
    workdir = Path("/")
    for instr, args in stages[0]:
        if instr == "WORKDIR":
            workdir = workdir / args
        elif instr == "COPY":
            assert "--from" not in args, args
            *sources, target = [p for p in args.split() if not p.startswith("--")]
            target_dir = dest / (workdir / target).relative_to("/")
            for src in sources:
                root = ROOT / src
                files = [
                    p
                    for p in (sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else [])
                    if p.is_file() and in_context(p.relative_to(ROOT).as_posix(), patterns)
                ]
                assert files, f"{dockerfile.name}: COPY {src}: not in the build context"
                into_dir = root.is_dir() or len(sources) > 1 or target.endswith("/")
                for path in files:
                    inner = path.relative_to(root) if root.is_dir() else Path(path.name)
                    out = target_dir / inner if into_dir else target_dir
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, out)
    return dest / workdir.relative_to("/")

"""Virtual environments beside the test run, for third-party tools that cannot share ours.

`pip_venv`: a venv with pinned requirements installed from the package index (img2dataset pins
an old webdataset), made once per requirement set and Python and kept in a cache folder
(`$UMT_TEST_VENVS`, default `$TMPDIR/umt-test-venvs-UID`): the first run pays the install,
later ones start at once. `linked_venv`: a venv that holds exactly some distributions of this
environment and their dependencies (linked, not installed: seconds, and the very same versions),
for code that must run where UMT is not installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

CACHE = Path(
    os.environ.get("UMT_TEST_VENVS")
    or Path(tempfile.gettempdir()) / f"umt-test-venvs-{os.getuid()}"
)


def pip_venv(name: str, requirements: list[str], timeout_s: int = 1800) -> Path:
    """The python of a cached venv holding `requirements` (pinned pip specifiers)."""
    key = hashlib.sha256(json.dumps([sys.version, sorted(requirements)]).encode()).hexdigest()
    folder = CACHE / f"{name}-{key[:12]}"
    python = folder / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once: one installs, one waits
        if (folder / "complete").is_file():
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *requirements],
            capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {requirements} failed:\n{proc.stderr[-4000:]}")
        (folder / "complete").write_text("\n".join(requirements) + "\n")
    return python


def linked_venv(folder: Path, distributions: list[str]) -> Path:
    """The python of a new venv in `folder` whose site-packages links `distributions` of this
    environment and everything they require (extras left out), and nothing else."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    for dist in dependency_closure(distributions):
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        here = Path(dist.locate_file(""))
        for top in tops:
            if top != "__pycache__" and not Path(site, top).exists():
                os.symlink(here / top, Path(site, top))
    return python


def dependency_closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions `names` and, recursively, those they require."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = _canonical(todo.pop())
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(found.values())


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

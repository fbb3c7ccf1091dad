"""The slow tier's scheduling: tests sharing a module fixture run on one worker (conftest's
`xdist_group`s under `-n 2 --dist loadgroup`), so a shared training run is made once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tests_sharing_a_module_fixture_run_it_once_under_loadgroup(tmp_path):
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "conftest.py").write_text(
        "from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n"
    )
    setups = tmp_path / "setups.txt"
    (tests / "test_shared.py").write_text(
        "import os\nimport pytest\n\n\n"
        '@pytest.fixture(scope="module")\n'
        "def run():\n"
        f"    with open({str(setups)!r}, 'a') as f:\n"
        "        f.write(f'{os.getpid()}\\n')\n\n\n"
        '@pytest.mark.parametrize("i", range(8))\n'
        "def test_uses_it(run, i):\n    pass\n\n\n"
        '@pytest.mark.parametrize("i", range(8))\n'
        "def test_does_not(i):\n    pass\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
         "no:cacheprovider", str(tests)],
        cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "16 passed" in proc.stdout
    assert len(setups.read_text().split()) == 1  # one worker ran every test that uses it

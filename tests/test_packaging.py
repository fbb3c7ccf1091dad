"""The package as a user installs it: a wheel holds every code package and the shipped configs
and Slurm templates, and from an empty folder `umt submit` and `umt demo` work on it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO


def test_the_wheels_package_list_is_the_tree():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    in_tree = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("umt", "data_pipeline", "launch")
        for p in (REPO / top).rglob("__init__.py")
    }
    assert listed - {"umt_configs", "umt_slurm"} == in_tree


def test_configs_are_named_by_path_or_name(tmp_path, capsys):
    from launch import config as config_cli
    from umt.config import ConfigError, load_config

    assert load_config("pretrain_base").model.preset == "base"
    assert load_config("pretrain_base.yaml").model.preset == "base"
    with pytest.raises(
        ConfigError, match="shipped configs, by name: demo_cpu, demo_multiway_cpu, pretrain_base"
    ):
        load_config("pretrain_nope")
    assert config_cli.main(["list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [
        "demo_cpu",
        "demo_multiway_cpu",
        "pretrain_base",
        "pretrain_large",
        "tiny_cpu",
    ]
    assert config_cli.main(["show", "pretrain_base"]) == 0
    shown = capsys.readouterr().out
    assert shown == (REPO / "configs" / "pretrain_base.yaml").read_text()
    mine = tmp_path / "mine.yaml"  # `umt config show NAME > my.yaml` starts a user's own
    mine.write_text(shown.replace("runs/pretrain_base", "runs/mine"))
    assert load_config(str(mine)).output_dir == "runs/mine"


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_works_from_an_empty_folder(tmp_path):
    """Not editable: `pip wheel` then `pip install` into a new venv whose other dependencies are
    this environment's (a path file to its site-packages keeps the test fast)."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(REPO), "-w", str(wheels)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # This environment's packages, after the venv's own (an editable umt here is not seen:
    # a plain path line does not run the .pth files in that folder).
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    [wheel] = wheels.glob("umt-*.whl")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UMT_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(venv / "bin" / "umt"), *args],
            cwd=empty, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip

    where = subprocess.run(
        [str(python), "-c", "import umt, umt_configs; print(umt.__file__, umt_configs.__path__)"],
        cwd=empty, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(REPO) not in where and site in where  # the wheel's code and files, not the tree's
    proc = run("submit", "train", "--config", "pretrain_base", "--dry-run", "--",
               "data.train.shards=/x", "data.tokenizer=/t")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --signal=" in proc.stdout and "--config" in proc.stdout
    # The demo's whole loop from the wheel, at its smallest (test_demo runs it at size).
    proc = run("demo", "--out", "demo", "--ranks", "1", "--train-size", "32", "--test-size", "8",
               "--steps", "2", "train.micro_batch_size=8")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (empty / "demo" / "results.json").is_file()

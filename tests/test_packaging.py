"""The wheel carries patches/ and configs/ as package data and installs into a fresh venv."""
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shipped_files(folder):
    exts = {".patch", ".py", ".yaml", ".yml", ".md"}
    return sorted(p.name for p in (REPO / folder).iterdir()
                  if p.is_file() and (p.suffix in exts or p.name.startswith("NOTICE")))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True)
    (whl,) = out.glob("otface_plugin-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_contains_patches_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("patches", "otface_plugin/patches"), ("configs", "otface_plugin/configs")):
        for name in _shipped_files(folder):
            assert f"{package}/{name}" in names, f"{folder}/{name} missing from the wheel"
    assert "otface_plugin/ot.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("otface-data", "otface-install", "otface-train", "otface-demo", "otface-bench", "otface-ckpt"):
        assert script in text


@pytest.mark.slow
def test_wheel_installs_in_fresh_venv_and_finds_its_data(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # outside the source tree, so the import comes from the installed wheel
    code = ("import importlib.resources as r, otface_plugin;"
            "print(otface_plugin.__file__);"
            "print(sorted(p.name for p in r.files('otface_plugin.patches').iterdir()));"
            "print(sorted(p.name for p in r.files('otface_plugin.configs').iterdir()))")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    lines = out.splitlines()
    assert str(env) in lines[0]
    for name in _shipped_files("patches"):
        assert name in lines[1]
    for name in _shipped_files("configs"):
        assert name in lines[2]


def test_version_has_a_changelog_section_and_ci_checks_the_release():
    import re

    import otface_plugin

    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (\S+)", changelog, flags=re.M)
    assert sections and sections[0] == otface_plugin.__version__, "the newest CHANGELOG.md section is not __version__"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ci.index("bash .ci/release_check.sh") > ci.index("make test")

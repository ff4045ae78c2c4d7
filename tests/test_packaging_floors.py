"""setup.py's dependency floors are the versions .ci/lowest_deps.sh tests (issue 9)."""
import ast
import re

from conftest import REPO


def setup_floors():
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    floors = {}
    for req in kw["install_requires"] + [r for reqs in kw["extras_require"].values() for r in reqs]:
        name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req).groups()
        assert floors.setdefault(name.lower(), version) == version, f"two floors for {name}"
    return floors


def test_floors_are_the_tested_pins():
    pins = {}
    for line in (REPO / ".ci" / "lowest-deps.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    floors = setup_floors()
    assert floors.pop("torch") == "2.1"  # not varied by the script (it installs TORCH=2.13.0)
    assert floors == pins

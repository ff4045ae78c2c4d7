"""README.md's code blocks work as written: the own-loop snippet runs, every command it names
answers ``--help``, the YAML it shows passes the config check, and its links lead somewhere."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SNIPPET_MARKER = "<!-- readme-snippet"
# every console script the package declares, and any the README names
COMMANDS = ["otface-install", "otface-data", "otface-bench", "otface-demo", "otface-train", "otface-ckpt"]


def fenced_blocks(text: str, lang: str):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def snippet() -> str:
    after = README.split(SNIPPET_MARKER, 1)
    assert len(after) == 2, f"README.md has no {SNIPPET_MARKER!r} marker before its python snippet"
    blocks = fenced_blocks(after[1], "python")
    assert blocks, "no ```python block after the snippet marker"
    return blocks[0]


class TinyBackbone(torch.nn.Module):
    """An iresnet-shaped stand-in: a ``layer4`` conv stage, then a 512-d embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.layer4 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer4(torch.relu(self.stem(x))).flatten(1))


def test_snippet_trains_on_tiny_tensors():
    torch.manual_seed(0)
    built = []

    def backbone_factory():
        built.append(TinyBackbone())
        return built[-1]

    P, K = 4, 2  # P identities x K images, as the snippet's comment asks
    loader = [(torch.randn(P * K, 3, 8, 8), torch.arange(P).repeat_interleave(K) + 100 * i) for i in range(2)]
    scope = {"MyBackbone": backbone_factory, "loader": loader}
    exec(compile(snippet(), "README.md snippet", "exec"), scope)
    (net,) = built
    assert torch.isfinite(scope["loss"]) and scope["loss"].item() > 0
    # the loop trained: the optimiser stepped the backbone it was given
    torch.manual_seed(0)
    fresh = TinyBackbone()
    assert not torch.equal(net.fc.weight, fresh.fc.weight)


def _script(name: str):
    """The console script installed beside this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def test_readme_names_only_known_commands():
    named = set(re.findall(r"\b(otface-[a-z]+)\b", README)) - {"otface-plugin"}
    assert named and named <= set(COMMANDS), f"README names commands this test does not run: {named - set(COMMANDS)}"


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command):
    exe = _script(command)
    if exe is None:
        pytest.skip(f"{command} is not installed in this environment")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and command in out.stdout.splitlines()[0]


def test_yaml_blocks_pass_the_config_check():
    import yaml

    from otface_plugin.arcface_torch.config import check_job

    blocks = fenced_blocks(README, "yaml")
    assert blocks, "README.md shows no YAML config"
    for block in blocks:
        job = yaml.safe_load(block)
        checked = check_job(job, where="README.md")
        assert checked.keys() == job.keys()
        assert checked["loss"] == "otface" and "otface" in checked


def test_the_two_fresh_machine_commands_are_what_make_and_ci_run():
    assert "make demo" in README and "make test" in README
    targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), flags=re.M)
    assert {"demo", "test"} <= set(targets)
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci, ".ci/run must run the README's test command"


def test_readme_is_a_short_user_page_with_working_links():
    lines = README.splitlines()
    assert len(lines) < 180
    for word in ("/work/", "session", "lent", "by the issue", "issue "):
        assert word not in README, f"README.md mentions {word!r}"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"

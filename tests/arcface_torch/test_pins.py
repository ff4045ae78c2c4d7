"""The upstream commit is named once, in pins.py; files that must still spell it out (patch
headers and NOTICE for the licence attribution, the README's how-to) spell the same one."""
import re
import subprocess
import sys

from conftest import REPO, SHARED_UPSTREAM

from otface_plugin.arcface_torch import pins

COMMIT_NEAR = re.compile(r"commit\s+`?([0-9a-f]{40})\b|@\s+([0-9a-f]{8})\b|arcface_torch-([0-9a-f]{8})\b"
                         r"|archive\s+([0-9a-f]{8,40})\b")


def test_every_spelled_out_upstream_commit_is_the_pinned_one():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False).stdout.split()
    if not files:  # not a git checkout (an sdist): nothing to compare
        return
    seen = {}
    for name in files:
        path = REPO / name
        if path.suffix in (".png", ".json") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in COMMIT_NEAR.finditer(text):
            seen.setdefault(next(g for g in m.groups() if g), set()).add(name)
    wrong = {sha: names for sha, names in seen.items() if not pins.UPSTREAM_COMMIT.startswith(sha)
             and sha != "ab27f4d6"}  # ab27f4d6: the last upstream change to the training code, not the pin
    assert not wrong, f"upstream commits other than pins.UPSTREAM_COMMIT: {wrong}"


def test_shared_export_name_and_shell_reader():
    assert pins.UPSTREAM_SHORT == pins.UPSTREAM_COMMIT[:8]
    assert SHARED_UPSTREAM.name == pins.SHARED_EXPORT == f"arcface_torch-{pins.UPSTREAM_SHORT}"
    out = subprocess.run([sys.executable, "-m", "otface_plugin.arcface_torch.pins", "export"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == pins.SHARED_EXPORT

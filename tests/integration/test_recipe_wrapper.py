"""otface-train, the no-patch route: same diffs in memory, refusal of unknown checkouts."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, needs_upstream

from otface_plugin.arcface_torch import installer, train_wrapper
from helpers import snapshot

pytestmark = [pytest.mark.upstream, needs_upstream]


@pytest.fixture
def checkout(upstream_checkout):
    return upstream_checkout


def test_in_memory_sources_equal_the_installed_files(checkout, tmp_path):
    sources = train_wrapper.patched_sources(checkout)
    other = tmp_path / "installed"
    shutil.copytree(checkout, other)
    installer.install(other)
    for rel, data in sources.items():
        assert data == (other / rel).read_bytes(), rel


def test_refuses_unknown_version_naming_files(checkout):
    (checkout / "losses.py").write_text("# changed\n")
    with pytest.raises(train_wrapper.RefusedCheckout, match=r"losses.py: modified"):
        train_wrapper.patched_sources(checkout)


def test_refuses_an_installed_checkout_with_a_hint(checkout):
    installer.install(checkout)
    with pytest.raises(train_wrapper.RefusedCheckout, match="already patched by otface-install"):
        train_wrapper.patched_sources(checkout)


def test_cli_refusal_exit_status(checkout):
    (checkout / "train_v2.py").write_text("print('mine')\n")
    r = subprocess.run([sys.executable, "-m", "otface_plugin.arcface_torch.train_wrapper", "configs/x.yaml",
                        "--arcface-root", str(checkout)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "train_v2.py: modified" in r.stderr


def test_import_hook_serves_patched_modules_and_leaves_the_checkout_alone(checkout):
    """In a fresh interpreter: the checkout's lr_scheduler (patched in memory) runs on this torch,
    the plugin's configs are found through the checkout's configs package."""
    before = snapshot(checkout)
    code = f"""
import torch, sys
from pathlib import Path
from otface_plugin.arcface_torch import train_wrapper
finder = train_wrapper.prepare(Path({str(checkout)!r}))
import lr_scheduler, partial_fc_v2, importlib
assert lr_scheduler.__file__ == {str(checkout / 'lr_scheduler.py')!r}
opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
s = lr_scheduler.PolynomialLRWarmup(opt, warmup_iters=2, total_iters=10)
s.step()
assert abs(s.get_last_lr()[0] - 0.05) < 1e-9
import inspect
assert ".to(device)" in inspect.getsource(partial_fc_v2.PartialFC_V2.sample)
cfg = importlib.import_module("configs.ms1mv3_r50_otface").config
assert cfg.loss == "otface"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=checkout.parent)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    after = snapshot(checkout)
    after = {k: v for k, v in after.items() if "__pycache__" not in k}
    assert after == before

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


# ---- one line for a missing dependency or another upstream version; a broken stdout ------------
from conftest import pythonpath  # noqa: E402
from stdout_faults import FAULTS, check_report, run_with_stdout  # noqa: E402

from otface_plugin.arcface_torch.patchset import git_blob_id  # noqa: E402
from otface_plugin.arcface_torch.pins import UPSTREAM_UNPATCHED_BLOBS  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1"}
# otface-train in an environment without MODULE (None in sys.modules: its import fails)
WITHOUT = "import sys; sys.modules[sys.argv.pop(1)] = None; " \
          "from otface_plugin.arcface_torch.train_wrapper import main; sys.exit(main())"


def test_a_missing_recipe_dependency_is_one_line_naming_it(checkout):
    """Before: a ModuleNotFoundError traceback from deep in train_v2.py's imports. tensorboard is
    the first of them train_v2.py imports (the package names that differ from the module's are
    in test_cli_errors.py)."""
    module = package = "tensorboard"
    before = snapshot(checkout)
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", WITHOUT, module, "configs/ms1mv3_r50_otface",
                        "--arcface-root", str(checkout)], capture_output=True, text=True, env=ENV, cwd=checkout)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.splitlines() == [f"otface-train: missing module '{module}' (imported by the recipe or its "
                                      f"config): pip install {package} (the recipe's whole environment: 'The "
                                      "training environment' in otface-plugin's docs/integration.md)"]
    assert {k: v for k, v in snapshot(checkout).items() if "__pycache__" not in k} == before


def test_another_upstream_version_is_one_line_naming_the_file_and_its_blob(checkout):
    f = checkout / "losses.py"  # pinned, not patched
    f.write_bytes(f.read_bytes() + b"\n# a later upstream commit\n")
    r = subprocess.run([sys.executable, "-m", "otface_plugin.arcface_torch.train_wrapper", "configs/x.yaml",
                        "--arcface-root", str(checkout)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"files that differ: losses.py: modified (blob {git_blob_id(f.read_bytes())[:10]}, pinned " \
           f"{UPSTREAM_UNPATCHED_BLOBS['losses.py'][:10]})" in r.stderr


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_stdout_does_not_stop_the_script_and_is_reported(checkout, fault):
    """``--run SCRIPT`` (here a probe in the checkout) prints, then writes its result file."""
    (checkout / "probe.py").write_text("import sys, pathlib\nprint('x' * 100000)\n"
                                       "pathlib.Path(sys.argv[1]).write_text('done')\n")
    marker = checkout.parent / "marker"
    r = run_with_stdout(fault, [sys.executable, "-m", "otface_plugin.arcface_torch.train_wrapper", "--arcface-root",
                                str(checkout), "--run", "probe.py", str(marker)], env=ENV, cwd=checkout)
    check_report(fault, r, "otface-train", 0)
    assert marker.read_text() == "done"

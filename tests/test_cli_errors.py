"""Expected failures of the command-line tools are one line on stderr and a non-zero exit
(issue 9 case 7): otface-train configs, otface-install on a wrong directory (the rest of
otface-install's are in integration/test_recipe_installer.py, otface-demo's in test_demo.py)."""
import os
import subprocess

import pytest
from conftest import REPO, needs_upstream


@pytest.mark.upstream
@pytest.mark.slow
@needs_upstream
@pytest.mark.parametrize("config, rc, message", [
    ("configs/bad_batch.py", 2, "otface-train: bad config: config: key 'batch_size' must be an integer, got str '16'"),
    ("configs/one_identity.yaml", 2, "otface-train: bad config: batch_size 8 equals num_instances 8"),
    ("configs/no_such_config", 2, "otface-train: bad config: no config configs/no_such_config"),
    ("configs/no_such.yaml", 1, "otface-train: error: configs/no_such.yaml: no such config file"),
])
def test_train_bad_configs_are_one_line(upstream_checkout, train_python, config, rc, message):
    (upstream_checkout / "configs" / "bad_batch.py").write_text(
        "from easydict import EasyDict as edict\nconfig = edict()\nconfig.batch_size = \"16\"\n")
    (upstream_checkout / "configs" / "one_identity.yaml").write_text(
        "loss: otface\nbatch_size: 8\nnum_instances: 8\nrec: synthetic\n")
    r = subprocess.run([train_python, "-W", "ignore", "-m", "otface_plugin.arcface_torch.train_wrapper", config,
                        "--arcface-root", str(upstream_checkout)], capture_output=True, text=True,
                       cwd=upstream_checkout, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == rc, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("otface-train")]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_install_on_a_wrong_directory_is_one_line(tmp_path, capsys):
    from otface_plugin.arcface_torch import installer

    assert installer.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("otface-install: refused: ") and "has no train_v2.py" in err

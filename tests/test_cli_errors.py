"""Expected failures of the command-line tools are one line on stderr and a non-zero exit
(issue 9 case 7): otface-demo options, otface-train configs. otface-install's are in
test_integration_installer.py."""
import os
import subprocess

import pytest
from conftest import REPO, needs_upstream

from otface_plugin import available_losses
from otface_plugin import demo


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-5"], "--steps must be at least 1, got -5"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--held-out", "1"], "--held-out must be at least 2, got 1"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["-P", "1"], "-P and -K must be at least 2"),
])
def test_demo_bad_numbers_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        demo.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"otface-demo: error: {message}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_demo_unknown_loss_lists_the_registered_ones(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--loss", "foo"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err == f"otface-demo: error: --loss 'foo' is not a registered loss; registered losses: " \
                  f"{', '.join(available_losses())}\n"
    assert "otface" in available_losses()


def test_demo_divergence_is_one_line_and_exit_1(capsys):
    rc = demo.main(["--steps", "3", "--lr", "1e30", "--identities", "8", "--held-out", "4", "-P", "4",
                    "--pairs", "20", "--log-every", "100"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("otface-demo: error: ")
    assert "NaN/inf" in err or "loss became" in err


def test_demo_runs(capsys):
    assert demo.main(["--steps", "2", "--identities", "8", "--held-out", "4", "-P", "4", "--pairs", "20"]) == 0
    assert "held-out verification accuracy" in capsys.readouterr().out


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

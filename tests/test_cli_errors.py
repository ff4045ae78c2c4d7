"""Expected failures of the command-line tools are one line on stderr and a non-zero exit:
otface-train configs, otface-install on a wrong directory (the rest of otface-install's are in
integration/test_recipe_installer.py, otface-demo's in test_demo.py). And every tool's rule for
a broken stdout (otface_plugin.cli_output): the work is done or not as the exit status says,
whether the reader closed the pipe or the disk is full."""
import os
import subprocess
import sys

import pytest
from conftest import REPO, needs_upstream, pythonpath
from stdout_faults import FAULTS, check_report, run_with_stdout


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


ENV = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1"}
# every console script of setup.py, as `python -m` runs it
TOOLS = {
    "otface-install": "otface_plugin.arcface_torch.installer",
    "otface-train": "otface_plugin.arcface_torch.train_wrapper",
    "otface-data": "otface_plugin.data.cli",
    "otface-bench": "otface_plugin.bench",
    "otface-demo": "otface_plugin.demo",
    "otface-ckpt": "otface_plugin.arcface_torch.checkpoint",
}


def test_every_console_script_is_covered():
    import re

    scripts = dict(re.findall(r'"(otface-[a-z]+)=([\w.]+):main"', (REPO / "setup.py").read_text()))
    assert {k: v.removesuffix(".cli") if k == "otface-bench" else v for k, v in scripts.items()} == TOOLS


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("prog", list(TOOLS))
def test_help_on_a_broken_stdout(prog, fault):
    """Before: a full disk gave "Exception ignored ... OSError" and exit 120."""
    r = run_with_stdout(fault, [sys.executable, "-m", TOOLS[prog], "--help"], env=ENV)
    check_report(fault, r, prog, 0)


@pytest.mark.parametrize("fault", FAULTS)
def test_data_build_rec_on_a_broken_stdout_keeps_its_outputs(tmp_path, fault):
    from helpers import make_faces

    from otface_plugin.data.inspect_rec import inspect_rec

    faces = make_faces(tmp_path / "faces", n_id=3, n_img=2)
    r = run_with_stdout(fault, [sys.executable, "-m", TOOLS["otface-data"], "build-rec", str(faces),
                                str(tmp_path / "out") + "/", "--no-progress"], env=ENV)
    check_report(fault, r, "otface-data", 0)
    summary = inspect_rec(str(tmp_path / "out" / "train.rec"), cache=False)
    assert summary["images"] == 6 and summary["identities"] == 3


@pytest.mark.parametrize("fault", FAULTS)
def test_data_error_on_a_broken_stdout_keeps_its_status(tmp_path, fault):
    r = run_with_stdout(fault, [sys.executable, "-m", TOOLS["otface-data"], "inspect", str(tmp_path / "no.rec")],
                        env=ENV)
    check_report(fault, r, "otface-data", 2, writes=False)
    assert r.stderr.startswith("otface-data inspect: error: ") and r.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_demo_trains_to_the_end_on_a_broken_stdout(fault):
    """Its step lines fail from the first one; the run still ends normally."""
    r = run_with_stdout(fault, [sys.executable, "-m", TOOLS["otface-demo"], "--steps", "2", "--identities", "8",
                                "--held-out", "4", "-P", "4", "--pairs", "20"], env=ENV)
    check_report(fault, r, "otface-demo", 0)


def test_stdout_closed_from_the_start_is_a_lost_output():
    """``>&-``: Python makes print() a silent no-op there; the tool says the output is lost."""
    r = subprocess.run([sys.executable, "-m", TOOLS["otface-data"], "--help"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=lambda: os.close(1))
    assert r.returncode == 74 and r.stderr == (
        "otface-data: could not write to standard output (Bad file descriptor); the output is incomplete; "
        "the command itself succeeded\n")


def test_unencodable_text_is_escaped_not_a_traceback(capsys):
    from otface_plugin.cli_output import run_cli

    class Ascii:  # a stdout whose encoding cannot hold the text (a C locale, an odd terminal)
        encoding, out = "ascii", []

        def write(self, text):
            self.out.append(text.encode("ascii").decode())

        def flush(self):
            pass

    real, sys.stdout = sys.stdout, Ascii()
    try:
        assert run_cli("otface-x", lambda: print("caf\u00e9 /tmp/\udcff") or 0) == 0
    finally:
        sys.stdout = real
    assert "".join(Ascii.out) == "caf\\xe9 /tmp/\\udcff\n"


@pytest.mark.parametrize("name, install", [("sklearn", "scikit-learn"), ("yaml", "PyYAML"),
                                           ("tensorboard", "tensorboard"), ("cv2.dnn", "opencv-python-headless")])
def test_missing_dependency_names_the_module_and_the_package(name, install):
    from otface_plugin.arcface_torch.train_wrapper import missing_dependency

    line = missing_dependency(ModuleNotFoundError(f"No module named '{name}'", name=name))
    assert line.startswith(f"missing module '{name}' (imported by the recipe or its config): pip install {install} ")
    assert "\n" not in line


def test_missing_dependency_behind_a_wrapping_import_error():
    """torch.utils.tensorboard re-raises a missing tensorboard as a plain ImportError."""
    from otface_plugin.arcface_torch.train_wrapper import missing_dependency

    try:
        try:
            raise ModuleNotFoundError("No module named 'tensorboard'", name="tensorboard")
        except ImportError:
            raise ImportError("TensorBoard logging requires TensorBoard version 1.15 or above")
    except ImportError as exc:
        assert "missing module 'tensorboard'" in missing_dependency(exc)

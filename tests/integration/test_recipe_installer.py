"""otface-install on a copy of a pristine arcface_torch checkout (conftest.upstream_root()).

The pristine recipe itself is never written: every test patches a copy under tmp_path.
"""
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO, UPSTREAM, needs_upstream

from otface_plugin.arcface_torch import installer
from otface_plugin.arcface_torch.patchset import git_blob_id
from otface_plugin.arcface_torch.pins import UPSTREAM_BLOBS
from helpers import snapshot

pytestmark = [pytest.mark.upstream, needs_upstream]


@pytest.fixture
def checkout(upstream_checkout):
    dst = upstream_checkout
    status, states = installer.check(dst)
    if status != "not installed":
        pytest.skip(f"the recipe is not a pristine pinned checkout: {status}")
    return dst


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "install_plugin.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_install_check_reinstall_revert(checkout):
    before = snapshot(checkout)
    r = run_cli(checkout, "--check")
    assert r.returncode == 1 and "not installed" in r.stdout

    r = run_cli(checkout)
    assert r.returncode == 0, r.stderr
    after = snapshot(checkout)
    changed = {k for k in after if before.get(k) != after[k]}
    expected_configs = {f"configs/{p.name}" for p in (REPO / "configs").iterdir()
                        if p.suffix in (".py", ".yaml") and p.name != "__init__.py"}
    assert changed == set(UPSTREAM_BLOBS) | expected_configs | {installer.MANIFEST}
    assert after["configs/__init__.py"] == before["configs/__init__.py"]  # ours is not copied
    for rel in expected_configs:
        assert after[rel] == (REPO / rel).read_bytes()

    r = run_cli(checkout, "--check")
    assert r.returncode == 0 and "installed in" in r.stdout

    r = run_cli(checkout)  # idempotent
    assert r.returncode == 0 and "already installed" in r.stdout
    assert snapshot(checkout) == after

    r = run_cli(checkout, "--revert")
    assert r.returncode == 0, r.stderr
    assert snapshot(checkout) == before  # byte for byte, copied configs and manifest gone
    r = run_cli(checkout, "--revert")
    assert r.returncode == 0 and "nothing to revert" in r.stdout


def test_dry_run_writes_nothing(checkout):
    before = snapshot(checkout)
    r = run_cli(checkout, "--dry-run")
    assert r.returncode == 0 and "would install" in r.stdout and "train_v2.py" in r.stdout
    assert snapshot(checkout) == before
    installer.install(checkout)
    patched = snapshot(checkout)
    r = run_cli(checkout, "--revert", "--dry-run")
    assert r.returncode == 0 and "would revert" in r.stdout
    assert snapshot(checkout) == patched


def test_refuses_modified_upstream_file_and_touches_nothing(checkout):
    target = checkout / "partial_fc_v2.py"
    target.write_bytes(target.read_bytes().replace(b"sample_rate: float = 1.0", b"sample_rate: float = 0.5"))
    (checkout / "lr_scheduler.py").write_bytes(b"# my own scheduler\n")
    before = snapshot(checkout)
    r = run_cli(checkout)
    assert r.returncode == 2
    assert "partial_fc_v2.py: modified" in r.stderr and "lr_scheduler.py: modified" in r.stderr
    assert "train_v2.py" not in r.stderr  # only the files that differ are named
    assert snapshot(checkout) == before
    assert run_cli(checkout, "--check").returncode == 2


def test_refuses_missing_file(checkout):
    (checkout / "torch2onnx.py").unlink()
    with pytest.raises(installer.InstallRefused, match="torch2onnx.py: missing"):
        installer.install(checkout)


def test_failure_half_way_restores_every_file(checkout, monkeypatch):
    before = snapshot(checkout)
    real = installer._atomic_write
    calls = []

    def flaky(path, data, mode):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        real(path, data, mode)

    monkeypatch.setattr(installer, "_atomic_write", flaky)
    with pytest.raises(OSError, match="simulated"):
        installer.install(checkout)
    monkeypatch.setattr(installer, "_atomic_write", real)
    assert snapshot(checkout) == before
    assert not list(checkout.rglob("*.otface-tmp"))


def test_revert_refuses_a_patched_file_edited_afterwards(checkout):
    installer.install(checkout)
    f = checkout / "train_v2.py"
    f.write_bytes(f.read_bytes() + b"# local edit\n")
    with pytest.raises(installer.InstallRefused, match="train_v2.py: modified"):
        installer.revert(checkout)


def test_revert_keeps_a_copied_config_the_user_changed(checkout):
    before = snapshot(checkout)
    installer.install(checkout)
    cfg = checkout / "configs" / "otface_cpu_smoke.py"
    cfg.write_text(cfg.read_text() + "config.num_epoch = 3\n")
    plan = installer.revert(checkout)
    assert any("kept configs/otface_cpu_smoke.py" in n for n in plan.notes)
    after = snapshot(checkout)
    assert "configs/otface_cpu_smoke.py" in after
    del after["configs/otface_cpu_smoke.py"]
    assert after == before


def test_refuses_to_overwrite_a_users_config(checkout):
    (checkout / "configs" / "ms1mv3_r50_otface.py").write_text("# mine\n")
    before = snapshot(checkout)
    with pytest.raises(installer.InstallRefused, match="configs/ms1mv3_r50_otface.py"):
        installer.install(checkout)
    assert snapshot(checkout) == before


def test_partially_patched_checkout_is_completed(checkout):
    installer.install(checkout)
    (checkout / "dataset.py").write_bytes(Path(UPSTREAM, "dataset.py").read_bytes())
    assert installer.check(checkout)[0] == "partially installed"
    plan = installer.install(checkout)
    assert list(plan.writes) == ["dataset.py"]
    assert installer.check(checkout)[0] == "installed"


def test_pinned_blob_ids_match_the_checkout():
    for rel, blob in UPSTREAM_BLOBS.items():
        assert git_blob_id(Path(UPSTREAM, rel).read_bytes()) == blob, rel


@pytest.mark.slow
def test_wheel_route_in_a_fresh_environment(checkout, tmp_path):
    """pip install the wheel into a new venv (no torch there) and run its otface-install."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(REPO)], check=True)
    (whl,) = dist.glob("otface_plugin-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)],
                   check=True)
    exe = env / "bin" / "otface-install"
    before = snapshot(checkout)
    r = subprocess.run([str(exe), str(checkout)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "installed otface-plugin" in r.stdout
    assert (checkout / "configs" / "ms1mv3_r50_otface.yaml").is_file()
    r = subprocess.run([str(exe), str(checkout), "--check"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(exe), str(checkout), "--revert"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert snapshot(checkout) == before


# ---- issue 9 cases 4 and 5: file modes, temp files of a killed run, permission problems -------
def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(checkout, umask):
    (checkout / "train_v2.py").chmod(0o750)
    (checkout / "dataset.py").chmod(0o604)
    r = subprocess.run([sys.executable, str(REPO / "install_plugin.py"), str(checkout)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=lambda: os.umask(umask))
    assert r.returncode == 0, r.stderr
    created = [checkout / installer.MANIFEST, *(checkout / rel for rel in installer.plan_revert(checkout).writes
                                                if rel.startswith("configs/"))]
    assert len(created) > 10
    assert {p.name: mode(p) for p in created} == {p.name: 0o666 & ~umask for p in created}
    assert mode(checkout / "train_v2.py") == 0o750 and mode(checkout / "dataset.py") == 0o604


KILL_AT_RENAME = """
import os, signal, sys
from otface_plugin.arcface_torch import installer
real, calls = os.replace, []
def replace(src, dst):  # SIGKILL just before the Nth rename: the temp file is written, not renamed
    calls.append(dst)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
installer.main(sys.argv[1:2] + sys.argv[3:])
"""


def kill_during(checkout, nth, *args):
    r = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(checkout), str(nth), *args],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == -9, r.stderr
    return sorted(str(p.relative_to(checkout)) for p in checkout.rglob(f"*{installer.TEMP_SUFFIX}"))


def test_killed_install_and_revert_leave_temp_files_the_next_run_removes(checkout):
    before = snapshot(checkout)
    left = kill_during(checkout, 3)  # dataset.py, eval/verification.py renamed; lr_scheduler.py's temp left
    assert len(left) == 1 and left[0].startswith(".lr_scheduler.py.")
    assert installer.check(checkout)[0] == "partially installed"
    r = run_cli(checkout, "--dry-run")
    assert r.returncode == 0 and f"would remove {left[0]}" in r.stdout
    r = run_cli(checkout)
    assert r.returncode == 0, r.stderr
    assert f"removed {left[0]} (left by an interrupted run)" in r.stdout
    assert not list(checkout.rglob(f"*{installer.TEMP_SUFFIX}"))
    assert installer.check(checkout)[0] == "installed"

    left = kill_during(checkout, 7, "--revert")  # the 7th rename is utils/utils_config.py
    assert len(left) == 1 and left[0].startswith("utils/.utils_config.py.")
    r = run_cli(checkout, "--revert")
    assert r.returncode == 0, r.stderr
    assert f"removed {left[0]}" in r.stdout
    assert snapshot(checkout) == before  # byte for byte, no temp file


def test_stale_temp_file_is_removed_when_already_installed(checkout):
    installer.install(checkout)
    stale = checkout / "configs" / ".ms1mv3_r50_otface.py.x1y2.otface-tmp"
    stale.write_bytes(b"half")
    theirs = checkout / "configs" / "notes.otface-tmp.txt"  # not ours: kept
    theirs.write_bytes(b"mine")
    r = run_cli(checkout)
    assert r.returncode == 0 and "already installed" in r.stdout and "removed configs/.ms1mv3" in r.stdout
    assert not stale.exists() and theirs.exists()


@pytest.mark.parametrize("action", ["install", "revert"])
def test_read_only_utils_is_a_one_line_error_saying_what_was_put_back(checkout, monkeypatch, capsys, action):
    """Simulated with a monkeypatched temp-file creation raising PermissionError for utils/ (the
    tests run as root, which ignores permission bits); test_read_only_utils_for_real checks the
    same with chmod where the tests do not run as root."""
    import errno

    from otface_plugin import atomicfile

    if action == "revert":
        installer.install(checkout)
    before = snapshot(checkout)
    real = atomicfile.create_new

    def create_new(path):
        if Path(path).parent.name == "utils":
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(path).parent))
        return real(path)

    monkeypatch.setattr(atomicfile, "create_new", create_new)
    rc = installer.main([str(checkout)] + (["--revert"] if action == "revert" else []))
    err = capsys.readouterr().err
    assert rc == 3
    assert err.count("\n") == 1 and "Traceback" not in err and "could not restore" not in err.lower()
    assert err.startswith("otface-install: failed: cannot write utils/utils_config.py: Permission denied; "
                          "put back dataset.py, eval/verification.py, lr_scheduler.py, partial_fc_v2.py, "
                          "torch2onnx.py, train_v2.py: ")
    assert err.rstrip().endswith("is as it was")
    assert snapshot(checkout) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (see the simulated test above)")
def test_read_only_utils_for_real(checkout):
    before = snapshot(checkout)
    (checkout / "utils").chmod(0o555)
    try:
        r = run_cli(checkout)
    finally:
        (checkout / "utils").chmod(0o755)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "cannot write utils/utils_config.py" in r.stderr
    assert snapshot(checkout) == before


def test_failure_on_the_first_file_says_nothing_was_changed(checkout, monkeypatch):
    before = snapshot(checkout)
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(installer.InstallFailed, match=r"^cannot write dataset.py: No space left; no file had been "
                                                      r"changed yet: .* is as it was$"):
        installer.install(checkout)
    assert snapshot(checkout) == before


def test_states_are_str_enums_that_print_as_before():
    assert installer.Status.INSTALLED == "installed" and f"{installer.Status.PARTIAL}" == "partially installed"
    assert str(installer.FileKind.MODIFIED) == "modified" and f"{installer.FileKind.MISSING:>8}" == " missing"
    assert {installer.Status.INSTALLED: 0}.get("installed") == 0


# ---- a broken stdout, interrupts at every point, foreign files, hostile names -------------------
from stdout_faults import FAULTS, check_report, run_with_stdout  # noqa: E402

CLI = [sys.executable, str(REPO / "install_plugin.py")]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def fully_installed(checkout: Path) -> bool:
    """Patched, with every config and the manifest in place: a new install would write nothing."""
    return installer.check(checkout)[0] == "installed" and not installer.plan_install(checkout).writes


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("args, installed_before, rc", [
    ([], False, 0), (["--revert"], True, 0), (["--check"], True, 0), (["--check"], False, 1),
], ids=["install", "revert", "check-installed", "check-not-installed"])
def test_a_broken_stdout_never_gives_a_false_report(checkout, fault, args, installed_before, rc):
    """Before: the install or revert was complete, then 'failed: ... nothing was changed', exit 3."""
    pristine = snapshot(checkout)
    if installed_before:
        installer.install(checkout)
    r = run_with_stdout(fault, [*CLI, str(checkout), *args], env=ENV)
    installed = installed_before if "--check" in args else not installed_before
    did = {"install": f"installed otface-plugin {installer.otface_plugin.__version__} in {checkout}",
           "--revert": f"reverted {checkout}", "--check": f"installed in {checkout}"}[(args or ["install"])[0]]
    check_report(fault, r, "otface-install", rc, did)
    assert fully_installed(checkout) if installed else snapshot(checkout) == pristine


SIGNAL_AT = """
import os, signal, sys
from otface_plugin.arcface_torch import installer
where, nth, sig = sys.argv[2], int(sys.argv[3]), getattr(signal, sys.argv[4])
real_replace, real_unlink, real_plan, steps = os.replace, os.unlink, installer.plan_install, []
def step():  # the signal arrives just before the Nth rename or removal
    steps.append(1)
    if where == "write" and len(steps) == nth:
        os.kill(os.getpid(), sig)
def replace(src, dst):
    step()
    real_replace(src, dst)
def unlink(path, *a, **k):
    step()
    real_unlink(path, *a, **k)
def plan_install(*a, **k):  # ... or while the checkout is being read
    if where == "plan":
        os.kill(os.getpid(), sig)
    return real_plan(*a, **k)
os.replace, os.unlink, installer.plan_install = replace, unlink, plan_install
sys.exit(installer.main(sys.argv[1:2] + sys.argv[5:]))
"""


def signal_during(checkout, where, nth, sig, *args):
    return subprocess.run([sys.executable, "-c", SIGNAL_AT, str(checkout), where, str(nth), sig, *args],
                          capture_output=True, text=True, env=ENV)


def test_sigterm_during_the_writes_lets_them_finish_and_says_so(checkout):
    """Before: SIGTERM's default action ended the process between two renames (partly patched)."""
    r = signal_during(checkout, "write", 3, "SIGTERM")
    assert r.returncode == 130 and r.stderr == f"otface-install: interrupted; the install was complete " \
                                               f"({checkout} is installed)\n"
    assert fully_installed(checkout) and not list(checkout.rglob(f"*{installer.TEMP_SUFFIX}"))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_interrupt_while_reading_the_checkout_changes_nothing(checkout, sig):
    before = snapshot(checkout)
    r = signal_during(checkout, "plan", 0, sig)
    assert r.returncode == 130 and r.stderr == f"otface-install: interrupted; before any file was written; " \
                                               f"{checkout} is as it was\n"
    assert snapshot(checkout) == before


@pytest.mark.parametrize("action", ["install", "revert"])
def test_sigkill_at_every_commit_point_leaves_a_state_the_next_run_completes(checkout, action):
    """SIGKILL before each rename and each removal of an install or a revert, in turn, until a
    run gets through: every file is left with its old or its new bytes (check never says
    'refused'), at most one temp file stays, and the same command run again finishes the job."""
    pristine = snapshot(checkout)
    args = ["--revert"] if action == "revert" else []
    for nth in range(1, 100):
        if action == "revert":
            installer.install(checkout)
        r = signal_during(checkout, "write", nth, "SIGKILL", *args)
        if r.returncode == 0:
            break
        assert r.returncode == -9, r.stderr
        assert len(installer.stale_temp_files(checkout)) <= 1, nth
        assert installer.check(checkout)[0] != "refused", nth
        getattr(installer, action)(checkout)
        assert not installer.stale_temp_files(checkout), nth
        assert fully_installed(checkout) if action == "install" else snapshot(checkout) == pristine, nth
        installer.revert(checkout)
    assert nth > 10  # every patched file, config and the manifest is a commit point


def test_wrong_upstream_version_is_one_line_naming_the_file_and_its_blob(checkout):
    """As a checkout at another commit would be: one pinned file with other bytes."""
    f = checkout / "partial_fc_v2.py"
    f.write_bytes(f.read_bytes().replace(b"import math", b"import math  # newer upstream"))
    blob = git_blob_id(f.read_bytes())
    before = snapshot(checkout)
    for args in ([], ["--revert"]):
        r = run_cli(checkout, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"files that differ: partial_fc_v2.py: modified (blob {blob[:10]}, pinned " \
               f"{UPSTREAM_BLOBS['partial_fc_v2.py'][:10]}). Nothing was changed." in r.stderr
    assert snapshot(checkout) == before


@pytest.mark.parametrize("foreign", ["binary", "folder", "symlink-loop"])
def test_a_foreign_file_where_an_upstream_file_should_be_is_refused(checkout, foreign):
    target = checkout / "dataset.py"
    target.unlink()
    if foreign == "binary":
        target.write_bytes(os.urandom(4096) + b"\xff\xfe")
        why = "dataset.py: modified (blob "
    elif foreign == "folder":
        target.mkdir()
        why = "dataset.py: not a regular file"
    else:
        target.symlink_to(target)
        why = "dataset.py: not a regular file"
    r = run_cli(checkout)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
    assert installer.check(checkout)[0] == "refused"


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_folder_where_a_config_goes_is_a_clash_not_a_hang(checkout, kind):
    """Before: reading the FIFO blocked forever; a folder gave 'failed: [Errno 21] ...'."""
    dest = checkout / "configs" / "ms1mv3_r50_otface.py"
    os.mkfifo(dest) if kind == "fifo" else dest.mkdir()
    before = snapshot(checkout)
    r = subprocess.run([*CLI, str(checkout)], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "configs/ms1mv3_r50_otface.py" in r.stderr
    assert snapshot(checkout) == before


@pytest.mark.parametrize("manifest", [
    b"[]", b'{"configs": "all"}', b"\xff\xfe not json", b'{"configs": {"configs/x.py": 3}}',
    b'{"configs": {"configs/../../victim.txt": "%s"}}', b'{"configs": {"../victim.txt": "%s"}}',
], ids=["list", "configs-str", "binary", "blob-not-str", "dotdot-inside", "outside"])
def test_a_foreign_manifest_refuses_and_deletes_nothing(checkout, manifest):
    """--revert deletes what the manifest lists: an entry naming a file outside configs/ (with
    that file's real blob id) must not be obeyed. Before: the victim was deleted, or a
    malformed manifest was an AttributeError traceback."""
    installer.install(checkout)
    victim = checkout.parent / "victim.txt"
    victim.write_bytes(b"the user's file\n")
    if b"%s" in manifest:
        manifest = manifest % git_blob_id(victim.read_bytes()).encode()
    (checkout / installer.MANIFEST).write_bytes(manifest)
    before = snapshot(checkout)
    for args in (["--revert"], []):
        r = run_cli(checkout, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"otface-install: refused: {checkout / installer.MANIFEST} is not a manifest "
                                   "otface-install wrote")
    assert victim.read_bytes() == b"the user's file\n" and snapshot(checkout) == before


@pytest.mark.parametrize("name", ["with space", "-leading-dash", "ünïcødé", "[glob]*?", "new\nline", b"bad\xffbytes"],
                         ids=["space", "dash", "unicode", "glob", "newline", "undecodable"])
def test_hostile_directory_names(tmp_path, name, request):
    """The checkout under a name a shell or a codec trips on: install, check and revert work and
    say so. Before: an undecodable name (a valid Linux file name) installed, then raised
    UnicodeEncodeError printing the report."""
    parent = os.fsencode(tmp_path) + b"/" + (name if isinstance(name, bytes) else os.fsencode(name))
    os.mkdir(parent)
    checkout = installer.copy_checkout(UPSTREAM, Path(os.fsdecode(parent)) / "arcface_torch")
    pristine = snapshot(checkout)
    env = {**ENV, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}

    def cli(*opts):
        return subprocess.run([*CLI, *opts, "--", os.fsencode(checkout)], capture_output=True, env=env)

    r = cli()
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert fully_installed(checkout)
    r = cli("--check")
    assert r.returncode == 0 and b"installed in" in r.stdout and r.stderr == b""
    r = cli("--revert")
    assert r.returncode == 0 and r.stderr == b"" and snapshot(checkout) == pristine

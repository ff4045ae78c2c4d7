"""End to end on CPU: patched arcface_torch trains with the plugin, resumes, exports.

Needs the recipe (ARCFACE_TORCH_DIR or the shared export, see conftest.py; only copies are patched), the face
set in ../shared/data/extyaleb (or OTFACE_FACES_DIR), and a training interpreter with the recipe's
own dependencies (mxnet, scikit-learn, tensorboard, onnx, onnxruntime, insightface): this one,
or the one OTFACE_TRAIN_PYTHON names (docs/integration.md: the "training environment").
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import copy_upstream, faces_dir, free_port, needs_upstream, otface_data, pythonpath

from otface_plugin.arcface_torch import installer

FACES = faces_dir()
COMPAT_AND_CPU = [
    "01-compat-lr-scheduler.patch", "02-compat-numpy.patch", "03-compat-onnx-export.patch",
    "04-compat-torchvision.patch", "05-compat-scipy.patch", "10-cpu-fallback.patch",
]

pytestmark = [
    pytest.mark.upstream,
    pytest.mark.slow,
    needs_upstream,
    pytest.mark.skipif(not FACES.is_dir(), reason=f"face images not found at {FACES} (set OTFACE_FACES_DIR)"),
]

OT_LINE = re.compile(r"OTFace   Global Step: (\d+)   Loss ([-\d.naif]+)   Margin ([-\d.naif]+)   OT ([-\d.naif]+)   "
                     r"Lambda ([-\d.]+)   HardTriplets (\d+)")
GRAD_SHARE = re.compile(r"GradShare ([\d.]+)   GradCos ([-\d.]+)")
LOSS_LINE = re.compile(r"Loss ([-\d.naif]+)   LearningRate ([-\d.e]+)   Epoch: (\d+)   Global Step: (\d+)")




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """.rec from the training identities (18), .bin from the held-out ones (20), and a 2-identity
    .rec for the short equivalence runs; all built by otface-data."""
    d = tmp_path_factory.mktemp("faces")
    # 20 held-out identities: the recipe scores a .bin in 10 sequential folds, and build-bin's 10
    # identity-disjoint folds (same/different pairs in each) need 2 identities per fold
    otface_data("split", FACES, "--holdout-fraction", 0.53, "--seed", 0,
                "--train-list", d / "train.txt", "--holdout-list", d / "heldout.txt")
    otface_data("build-rec", FACES, f"{d / 'rec'}/", "--identities-from", d / "train.txt", "--resize", 112,
                "--no-progress")
    otface_data("build-bin", FACES, d / "rec" / "heldout.bin", "--identities-from", d / "heldout.txt",
                "--pairs", 200, "--folds", 10, "--resize", 112, "--no-progress")
    small = d / "small.txt"
    small.write_text("".join((d / "train.txt").read_text().splitlines(keepends=True)[:2]))
    otface_data("build-rec", FACES, f"{d / 'small'}/", "--identities-from", small, "--resize", 112, "--no-progress")
    train_ids = len((d / "train.txt").read_text().split())
    heldout = (d / "heldout.txt").read_text().split()
    return {"rec": d / "rec", "small": d / "small", "num_classes": train_ids, "heldout_ids": heldout}



def torchrun(py, root: Path, config: str, nproc: int, timeout: int, script=("train_v2.py",), env=None):
    env = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    cmd = [py, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           *script, config]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def step_losses(log: str):
    return [(int(m.group(4)), m.group(1)) for m in LOSS_LINE.finditer(log)]


EQ_JOB = """from easydict import EasyDict as edict
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = False
config.batch_size = 16
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 100000
config.frequent = 1
config.dali = False
config.num_workers = 1
config.rec = "{rec}"
config.num_classes = 2
config.num_image = 128
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = []
"""


def test_arcface_through_the_plugin_equals_upstream_head(tmp_path, data, train_python):
    """loss: arcface in a fully patched checkout (and through the no-patch wrapper) gives the same
    step losses and the same final weights as a checkout with only the compatibility and CPU
    patches (upstream's own head and sampler), same seed and data, on CPU."""
    import torch

    job = EQ_JOB.format(rec=data["small"])
    base = copy_upstream(tmp_path / "compat_only")
    installer.install(base, patch_names=COMPAT_AND_CPU, configs=False)
    (base / "configs" / "eq_job.py").write_text(job)
    full = copy_upstream(tmp_path / "patched")
    installer.install(full)
    (full / "configs" / "eq_job.py").write_text(job + 'config.loss = "arcface"\n')
    pristine = copy_upstream(tmp_path / "pristine")
    (pristine / "configs" / "eq_job.yaml").write_text(_yaml_of(job) + "loss: arcface\noutput: work_dirs/eq_job\n")

    torchrun(train_python, base, "configs/eq_job", 1, 600)
    torchrun(train_python, full, "configs/eq_job", 1, 600)
    torchrun(train_python, pristine, "configs/eq_job.yaml", 1, 600,
             script=("-m", "otface_plugin.arcface_torch.train_wrapper", "--arcface-root", str(pristine)))

    logs = {k: (root / "work_dirs" / "eq_job" / "training.log").read_text()
            for k, root in (("base", base), ("full", full), ("wrapper", pristine))}
    base_losses = step_losses(logs["base"])
    assert len(base_losses) >= 6, logs["base"][-2000:]
    assert step_losses(logs["full"]) == base_losses
    assert step_losses(logs["wrapper"]) == base_losses
    assert "OTFace" not in logs["full"]
    weights = {k: torch.load(root / "work_dirs" / "eq_job" / "model.pt", map_location="cpu")
               for k, root in (("base", base), ("full", full), ("wrapper", pristine))}
    for k in ("full", "wrapper"):
        assert weights[k].keys() == weights["base"].keys()
        assert all(torch.equal(weights[k][n], weights["base"][n]) for n in weights["base"]), k
    print("arcface equivalence, step losses:", base_losses)


def _yaml_of(job_py: str) -> str:
    """The python job above as YAML (same keys, same values)."""
    import runpy

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"otface_eq_{os.getpid()}.py"
    path.write_text(job_py)
    cfg = runpy.run_path(str(path))["config"]
    path.unlink()
    lines = []
    for k, v in cfg.items():
        if k == "output":
            continue
        lines.append(f"{k}: {json.dumps(list(v) if isinstance(v, tuple) else v)}")
    return "\n".join(lines) + "\n"


E2E_JOB = """\
loss: otface
network: {network}
output: null
batch_size: 16
num_instances: 4
optimizer: adamw
lr: 0.001
weight_decay: 0.1
fp16: false
verbose: {verbose}
frequent: 1
num_workers: 1
save_all_states: true
resume: {resume}
rec: {rec}
num_classes: {num_classes}
num_image: {num_image}
num_epoch: {epochs}
warmup_epoch: 0
val_targets: [heldout]
"""
# Jobs with only `loss: otface` (no otface: block): the OT term's layer is chosen per backbone.
# 2 processes x 16 images, so num_image / 32 steps per epoch; `epochs` epochs, then one more resumed.
E2E_RUNS = {
    "mbf": dict(steps_per_epoch=16, epochs=2, verify=True),  # 32 steps, .bin scored at 16 and 32
    "vit_t": dict(steps_per_epoch=4, epochs=1, verify=False),  # ~10x the cost per step of mbf on CPU
}


def e2e_job(network, data, resume, epochs):
    run = E2E_RUNS[network]
    return E2E_JOB.format(network=network, resume=resume, rec=data["rec"], num_classes=data["num_classes"],
                          num_image=run["steps_per_epoch"] * 32, epochs=epochs,
                          verbose=run["steps_per_epoch"] if run["verify"] else 10 ** 6)


@pytest.fixture(scope="module", params=list(E2E_RUNS))
def otface_run(request, tmp_path_factory, data, train_python):
    """2 processes (gloo), OTFace with no otface: block, P x K = 4 x 4 per process: `epochs`
    epochs, then a resumed epoch from the checkpoint."""
    network, run = request.param, E2E_RUNS[request.param]
    root = copy_upstream(tmp_path_factory.mktemp(f"otface_{network}") / "arcface_torch")
    installer.install(root)
    cfg = root / "configs" / "e2e_otface.yaml"
    cfg.write_text(e2e_job(network, data, "false", run["epochs"]))
    first = torchrun(train_python, root, "configs/e2e_otface.yaml", 2, 1200)
    log_first = (root / "work_dirs" / "e2e_otface" / "training.log").read_text()
    cfg.write_text(e2e_job(network, data, "true", run["epochs"] + 1))
    second = torchrun(train_python, root, "configs/e2e_otface.yaml", 2, 900)
    log_all = (root / "work_dirs" / "e2e_otface" / "training.log").read_text()
    return {"network": network, "root": root, "out": root / "work_dirs" / "e2e_otface", "log_first": log_first,
            "log_resumed": log_all[len(log_first):], "stdout": first.stdout + second.stdout,
            "steps": run["steps_per_epoch"] * run["epochs"], "steps_per_epoch": run["steps_per_epoch"],
            "verify": run["verify"]}


def ot_rows(log):
    return [(int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4)), float(m.group(5)),
             int(m.group(6))) for m in OT_LINE.finditer(log)]


def test_otface_two_process_run(otface_run):
    rows = ot_rows(otface_run["log_first"])
    steps = [r[0] for r in rows]
    n = otface_run["steps"]
    assert steps == list(range(1, n + 1)), steps  # logged every step
    layer = {"mbf": "MobileFaceNet.conv_sep", "vit_t": "VisionTransformer.norm"}[otface_run["network"]]
    assert f"the OT term reads {layer}" in otface_run["log_first"]
    losses = [r[1] for r in rows]
    assert all(map(lambda x: x == x and abs(x) < 1e6, losses)), losses  # finite
    assert all(r[5] > 0 for r in rows), "a batch without hard triplets"
    assert all(r[3] > 0 for r in rows), "OT term is zero"
    assert all(r[4] == pytest.approx(0.1) for r in rows)  # the default lambda, no warm-up
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    if n >= 30:
        assert last < first, (first, last)
    if otface_run["verify"]:
        for step in range(otface_run["steps_per_epoch"], n + 1, otface_run["steps_per_epoch"]):
            assert re.search(rf"\[heldout\]\[{step}\]Accuracy-Flip: [\d.]+", otface_run["log_first"]), step
    events = list((otface_run["out"] / "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(b"otface/ot" in e.read_bytes() for e in events)
    print(f"OTFace 2-process run ({otface_run['network']}, {n} steps): loss first-5 mean {first:.4f}, last-5 mean "
          f"{last:.4f}; triplets/batch min {min(r[5] for r in rows)}; OT {rows[0][3]:.4f} -> {rows[-1][3]:.4f}")


def test_resume_continues_the_step_count(otface_run):
    import torch

    n, k = otface_run["steps"], otface_run["steps_per_epoch"]
    rows = ot_rows(otface_run["log_resumed"])
    assert [r[0] for r in rows] == list(range(n + 1, n + k + 1))
    assert all(r[1] == r[1] for r in rows)
    # the loss's step buffer came back from state_dict_softmax_fc (a lambda warm-up continues
    # where it stopped): after the resumed epoch it counts every step, not only the last epoch's
    for rank in (0, 1):
        ckpt = torch.load(otface_run["out"] / f"checkpoint_gpu_{rank}.pt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == n + k
        assert ckpt["state_dict_softmax_fc"]["loss.step"].item() == n + k


def test_export_onnx_and_load_with_insightface(otface_run, data, train_python):
    root, out, network = otface_run["root"], otface_run["out"], otface_run["network"]
    env = {**os.environ, "PYTHONPATH": pythonpath(), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([train_python, "torch2onnx.py", str(out / "model.pt"), "--network", network,
                        "--output", str(out / "model.onnx")], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    face_dir = FACES / data["heldout_ids"][0]
    face = sorted(face_dir.glob("*.pgm"))[0]
    check = CHECK_EXPORT.format(root=str(root), network=network, pt=str(out / "model.pt"),
                                onnx=str(out / "model.onnx"), face=str(face))
    r = subprocess.run([train_python, "-c", check], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"export ({network}):", result)
    assert result["max_abs_diff"] < 1e-4
    assert result["taskname"] == "recognition"
    assert result["embedding_shape"] == [512]
    assert result["embedding_finite"]


# Recipe options a user's job may set beside `loss: otface`: each in a short run (4 steps, mbf).
OPTION_RUNS = {
    "sample_rate": "sample_rate: 0.5\n",  # PartialFC_V2 samples half of the class centres
    "gradient_acc": "gradient_acc: 2\n",  # one optimizer step every 2 backward passes
    "wandb": "using_wandb: true\nwandb_log_all: false\n",  # offline (WANDB_MODE), components in its history
    "fp16_cpu": "fp16: true\n",  # no CUDA here: said at start, trains in float32
    # the adaptive lambda (issue 20): moves from its start of 1 each step, the same on both ranks
    "lambda_auto": "otface:\n  lambda_ot: auto\n  lambda_rate: 0.5\n",
}


@pytest.mark.parametrize("option", list(OPTION_RUNS))
def test_recipe_option_with_otface(option, tmp_path, data, train_python):
    root = copy_upstream(tmp_path / "arcface_torch")
    installer.install(root)
    job = E2E_JOB.format(network="mbf", resume="false", rec=data["rec"], num_classes=data["num_classes"],
                         num_image=4 * 32, epochs=1, verbose=10 ** 6)
    job = job.replace("fp16: false\n", "").replace("val_targets: [heldout]\n", "val_targets: []\n")
    (root / "configs" / "option.yaml").write_text(job + OPTION_RUNS[option])
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    r = torchrun(train_python, root, "configs/option.yaml", 2, 900, env=env)
    log = (root / "work_dirs" / "option" / "training.log").read_text()
    rows = ot_rows(log)
    assert [row[0] for row in rows] == [1, 2, 3, 4], log[-2000:]
    assert all(row[1] == row[1] and row[5] > 0 for row in rows), rows
    if option == "wandb":
        runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(runs) == 1, (runs, r.stdout[-3000:], r.stderr[-3000:])  # rank 0 only (wandb_log_all: false)
        history = wandb_history(train_python, runs[0])
        logged = {row["otface/global_step"]: row for row in history if "otface/global_step" in row}
        assert sorted(logged) == [1, 2, 3, 4], history
        assert all(isinstance(logged[s]["otface/ot"], float) and logged[s]["otface/triplets"] > 0 for s in logged)
        assert [row["Loss/Step Loss"] for row in history if "Loss/Step Loss" in row]  # the recipe's own rows
    if option == "fp16_cpu":
        assert "fp16: true, but CUDA is not available" in r.stderr
    if option == "lambda_auto":
        import torch

        lambdas = [row[4] for row in rows]
        assert lambdas[0] == pytest.approx(1.0, abs=1e-4) and len(set(lambdas)) == 4, lambdas
        states = [torch.load(root / "work_dirs" / "option" / f"checkpoint_gpu_{rank}.pt", map_location="cpu",
                             weights_only=False)["state_dict_softmax_fc"] for rank in (0, 1)]
        assert torch.equal(states[0]["loss.lambda_auto"], states[1]["loss.lambda_auto"])
        assert GRAD_SHARE.search(log), "no GradShare in the training log"
    print(f"{option}: {len(rows)} steps, loss {rows[0][1]:.3f} -> {rows[-1][1]:.3f}, OT {rows[-1][3]:.4f}")


WANDB_HISTORY = """
import json, struct, sys
from wandb.proto import wandb_internal_pb2 as pb
data, pos, chunk, out = open(sys.argv[1], "rb").read(), 7, b"", []
assert data[:4] == b":W&B", data[:7]
while pos + 7 <= len(data):  # LevelDB-style log: 32 KiB blocks of (crc, length, type) records
    if 32768 - pos % 32768 < 7:
        pos += 32768 - pos % 32768
        continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
        record = pb.Record()
        record.ParseFromString(chunk)
        chunk = b""
        if record.WhichOneof("record_type") == "history":
            out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
print(json.dumps(out))
"""


def wandb_history(py, run_file: Path):
    """The history rows of an offline wandb run file, read with wandb's own record protobuf."""
    r = subprocess.run([py, "-W", "ignore", "-c", WANDB_HISTORY, str(run_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


CHECK_EXPORT = """
import json, sys
import numpy as np, torch, onnxruntime, cv2
sys.path.insert(0, {root!r})
from backbones import get_model
net = get_model({network!r}, dropout=0.0, fp16=False, num_features=512)
net.load_state_dict(torch.load({pt!r}, map_location="cpu"))
net.eval()
x = torch.from_numpy(np.random.RandomState(0).uniform(-1, 1, size=(4, 3, 112, 112)).astype(np.float32))
with torch.no_grad():
    ref = net(x).numpy()
sess = onnxruntime.InferenceSession({onnx!r}, providers=["CPUExecutionProvider"])
# one image per run: torch2onnx.py traces with a batch of 1 and MobileFaceNet's Flatten
# (x.view(x.size(0), -1)) and the ViT's reshape are folded to that size; insightface also feeds one
# face at a time
got = np.concatenate([sess.run(None, {{sess.get_inputs()[0].name: x[i:i + 1].numpy()}})[0] for i in range(len(x))])
import insightface
model = insightface.model_zoo.get_model({onnx!r}, providers=["CPUExecutionProvider"])
model.prepare(ctx_id=-1)
gray = cv2.imread({face!r}, cv2.IMREAD_GRAYSCALE)
h, w = gray.shape
s = min(h, w)
gray = gray[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
aligned = cv2.cvtColor(cv2.resize(gray, (112, 112)), cv2.COLOR_GRAY2BGR)
emb = model.get_feat(aligned)[0]
print(json.dumps({{"max_abs_diff": float(np.abs(ref - got).max()), "taskname": model.taskname,
                  "embedding_shape": list(emb.shape), "embedding_finite": bool(np.isfinite(emb).all())}}))
"""


def run_job(py, root: Path, job: str, name: str, nproc: int = 1, timeout: int = 600):
    """train_v2.py on ``configs/<name>.yaml`` under torchrun; the finished process (any status)."""
    (root / "configs" / f"{name}.yaml").write_text(job)
    env = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [py, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "train_v2.py", f"configs/{name}.yaml"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line(r, root: Path, pattern: str):
    """Refused: exit != 0, the plugin's one line, and no traceback through the recipe's code (the
    launcher's own report of a failed child stays)."""
    assert r.returncode != 0, r.stdout[-2000:]
    lines = [x for x in r.stderr.splitlines() if "otface-plugin: bad config:" in x]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr[-4000:]
    assert f'File "{root / "train_v2.py"}"' not in r.stderr, r.stderr[-4000:]


SHORT_JOB = dict(network="mbf", verbose=10 ** 6, num_image=32, epochs=1)  # 2 steps of 16 on one process


def short_job(data, resume="false", num_classes=None, extra=""):
    return E2E_JOB.format(resume=resume, rec=data["rec"], num_classes=num_classes or data["num_classes"],
                          **SHORT_JOB).replace("val_targets: [heldout]", "val_targets: []") + extra


def test_num_classes_below_the_rec_labels_is_refused(tmp_path, data, train_python):
    """num_classes: 2 for a .rec of 18 identities: refused where the plugin's sampler indexes the
    .rec, one line naming the key, the file and the label range; the .rec is unchanged."""
    root = copy_upstream(tmp_path / "arcface_torch")
    installer.install(root)
    rec = data["rec"] / "train.rec"
    before = rec.read_bytes()
    r = run_job(train_python, root, short_job(data, num_classes=2), "few_classes")
    n = data["num_classes"]
    assert_one_line(r, root, rf"key 'num_classes' is 2, but {re.escape(str(rec))} holds {n} identities with labels "
                             rf"0\.\.{n - 1}")
    assert rec.read_bytes() == before


def test_unknown_feature_layer_is_refused_at_load(tmp_path, data, train_python):
    root = copy_upstream(tmp_path / "arcface_torch")
    installer.install(root)
    r = run_job(train_python, root, short_job(data, extra="otface:\n  layer: nosuchlayer\n"), "bad_layer")
    assert_one_line(r, root, r"MobileFaceNet has no submodule 'nosuchlayer' \(option otface\.layer\).*'conv_sep'")
    assert not (root / "work_dirs" / "bad_layer" / "training.log").exists()  # before any training


def test_resume_with_the_other_lambda_kind_is_one_line(tmp_path, data, train_python):
    """A fixed-lambda run's checkpoint resumed with lambda_ot: auto: one line naming the key, not
    a traceback through train_v2.py's resume; the checkpoint is left as it was."""
    root = copy_upstream(tmp_path / "arcface_torch")
    installer.install(root)
    first = run_job(train_python, root, short_job(data, extra="otface:\n  lambda_ot: 0.1\n"), "lam")
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = root / "work_dirs" / "lam" / "checkpoint_gpu_0.pt"
    before = ckpt.read_bytes()
    r = run_job(train_python, root, short_job(data, resume="true", extra="otface:\n  lambda_ot: auto\n"), "lam")
    assert_one_line(r, root, r"key 'resume': the checkpoint's state_dict_softmax_fc does not fit")
    assert ckpt.read_bytes() == before

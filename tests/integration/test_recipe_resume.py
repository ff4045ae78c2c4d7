"""Resume on another number of ranks, in the patched recipe on CPU (gloo).

2 ranks train 2 epochs with `loss: otface` (adaptive lambda) and save; the set then resumes on 1
rank and on 3. Each resumed run goes through train_v2.py's own resume block; a probe wraps the
plugin's resume call to keep what each rank holds right after loading (the checkpoint layout),
then training goes on for one more epoch.

Needs what tests/integration/test_recipe_train.py needs (the recipe, the face set, the training
interpreter).
"""
import os
import re
import shutil
import subprocess

import pytest
from conftest import copy_upstream, faces_dir, free_port, needs_upstream, otface_data, pythonpath

from otface_plugin.arcface_torch import checkpoint as ck
from otface_plugin.arcface_torch import installer

FACES = faces_dir()
pytestmark = [
    pytest.mark.upstream,
    pytest.mark.slow,
    needs_upstream,
    pytest.mark.skipif(not FACES.is_dir(), reason=f"face images not found at {FACES} (set OTFACE_FACES_DIR)"),
]

LOSS_LINE = re.compile(r"Loss ([-\d.naif]+)   LearningRate ([-\d.e]+)   Epoch: (\d+)   Global Step: (\d+)")
NUM_IMAGE, BATCH = 128, 16  # steps per epoch: 8 on 1 rank, 4 on 2, 2 on 3

JOB = """\
loss: otface
otface:
  lambda_ot: auto
network: mbf
output: {output}
batch_size: {batch}
num_instances: 4
optimizer: sgd
lr: 0.1
fp16: false
verbose: 1000000
frequent: 1
num_workers: 1
save_all_states: true
resume: {resume}
rec: {rec}
num_classes: {num_classes}
num_image: {num_image}
num_epoch: {epochs}
warmup_epoch: 1
val_targets: []
"""

# torchrun runs this instead of train_v2.py: the same train_v2.py as __main__, with the plugin's
# resume wrapped to save what each rank loaded, in checkpoint form, before training goes on
PROBE = """
import os, runpy, sys
import torch
sys.path.insert(0, os.getcwd())
from otface_plugin.arcface_torch import hooks
from otface_plugin.arcface_torch.checkpoint import META_KEY, checkpoint_name

resume = hooks.resume

def probe(cfg, rank, world_size, backbone, head, opt, lr_scheduler):
    epoch, step = resume(cfg, rank, world_size, backbone, head, opt, lr_scheduler)
    state = {"epoch": epoch, "global_step": step, "state_dict_backbone": backbone.state_dict(),
             "state_dict_softmax_fc": head.state_dict(), "state_optimizer": opt.state_dict(),
             "state_lr_scheduler": lr_scheduler.state_dict(), "last_lr": lr_scheduler.get_last_lr(),
             "group_lr": [g["lr"] for g in opt.param_groups],
             META_KEY: {"ranks": world_size, "step_world_size": world_size}}
    torch.save(state, os.path.join(os.environ["PROBE_DIR"], checkpoint_name(rank)))
    return epoch, step

hooks.resume = probe
sys.argv = ["train_v2.py", *sys.argv[1:]]
runpy.run_path("train_v2.py", run_name="__main__")
"""


def torchrun(py, root, config, nproc, script, env=None, timeout=900):
    env = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    cmd = [py, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           script, config]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_python):
    d = tmp_path_factory.mktemp("resume")
    otface_data("split", FACES, "--holdout-fraction", 0.53, "--seed", 0,
                "--train-list", d / "train.txt", "--holdout-list", d / "heldout.txt")
    otface_data("build-rec", FACES, f"{d / 'rec'}/", "--identities-from", d / "train.txt", "--resize", 112,
                "--no-progress")
    num_classes = len((d / "train.txt").read_text().split())
    root = copy_upstream(d / "arcface_torch")
    installer.install(root)
    (root / "probe.py").write_text(PROBE)

    def job(name, resume, epochs, output):
        (root / "configs" / f"{name}.yaml").write_text(JOB.format(
            output=output, batch=BATCH, resume=resume, rec=d / "rec", num_classes=num_classes,
            num_image=NUM_IMAGE, epochs=epochs))
        return f"configs/{name}.yaml"

    saved = d / "saved"
    torchrun(train_python, root, job("first", "false", 2, saved), 2, "train_v2.py")
    out = {"root": root, "saved": saved, "num_classes": num_classes, "python": train_python}
    for ranks in (1, 3):
        work, probe = d / f"on{ranks}", d / f"probe{ranks}"
        shutil.copytree(saved, work)
        probe.mkdir()
        before = (work / "training.log").read_text()
        torchrun(train_python, root, job(f"on{ranks}", "true", 3, work), ranks, "probe.py",
                 env={"PROBE_DIR": str(probe)})
        out[ranks] = {"work": work, "probe": probe, "log": (work / "training.log").read_text()[len(before):]}
    return out


def test_saved_set_records_its_layout(runs):
    info = ck.describe(ck.read_set(runs["saved"]))
    assert (info["ranks"], info["classes"], info["epoch"], info["global_step"], info["precision"]) == (
        2, runs["num_classes"], 2, 8, "fp32")


@pytest.mark.parametrize("ranks", [1, 3])
def test_resume_loads_the_same_class_centres_and_optimizer_state(runs, ranks):
    import torch

    before = ck.merge(ck.read_set(runs["saved"]))
    after = ck.merge(ck.read_set(runs[ranks]["probe"]))
    assert after["ranks"] == ranks
    key = before["centre_key"]
    assert after["centre_key"] == key
    b, a = before["checkpoint"], after["checkpoint"]
    assert torch.equal(a["state_dict_softmax_fc"][key], b["state_dict_softmax_fc"][key])
    assert a["state_dict_softmax_fc"][key].shape[0] == runs["num_classes"]
    sb, sa = b["state_optimizer"]["state"], a["state_optimizer"]["state"]
    assert sorted(sa) == sorted(sb)
    for pid in sb:  # the backbone's momentum and the class centres' (merged), every parameter
        for name in sb[pid]:
            assert torch.equal(sa[pid][name], sb[pid][name]), (pid, name)
    # the OTFace state continues: its step counter, the adaptive lambda and its gradient statistics
    for name, value in b["state_dict_softmax_fc"].items():
        if name != key:
            assert torch.equal(a["state_dict_softmax_fc"][name], value), name
    assert b["state_dict_softmax_fc"]["loss.step"].item() == 8
    for name, value in b["state_dict_backbone"].items():  # rank 0's backbone, BatchNorm buffers included
        assert torch.equal(a["state_dict_backbone"][name], value), name


EMBED = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from backbones import get_model
from torch.nn.functional import normalize
x = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
out = []
for path in sys.argv[2:]:
    merged = torch.load(path, weights_only=False)
    net = get_model("mbf", dropout=0.0, fp16=False, num_features=512)
    net.load_state_dict(merged["checkpoint"]["state_dict_backbone"])
    net.eval()
    with torch.no_grad():
        centres = merged["checkpoint"]["state_dict_softmax_fc"][merged["centre_key"]]
        out.append(normalize(net(x)) @ normalize(centres).T)
assert out[0].shape == (4, centres.shape[0])
print(float((out[0] - out[1]).abs().max()))
"""


@pytest.mark.parametrize("ranks", [1, 3])
def test_logits_of_a_fixed_input_equal_between_saved_and_resumed_model(runs, ranks, tmp_path):
    ck.write_merged(ck.merge(ck.read_set(runs["saved"])), tmp_path / "saved.pt")
    ck.write_merged(ck.merge(ck.read_set(runs[ranks]["probe"])), tmp_path / "resumed.pt")
    r = subprocess.run([runs["python"], "-c", EMBED, str(runs["root"]), str(tmp_path / "saved.pt"),
                        str(tmp_path / "resumed.pt")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": pythonpath(), "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) == 0.0


SCHEDULE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from lr_scheduler import PolynomialLRWarmup
spe, epochs, warmup, steps = (int(v) for v in sys.argv[2:])
opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
s = PolynomialLRWarmup(optimizer=opt, warmup_iters=spe * warmup, total_iters=spe * epochs)
lrs = [s.get_last_lr()[0]]
for _ in range(steps):
    opt.step()
    s.step()
    lrs.append(s.get_last_lr()[0])
print(json.dumps(lrs))
"""


def schedule(runs, world_size, steps):
    """The recipe's own LR schedule of the resumed job (3 epochs, 1 warm-up) on ``world_size``
    ranks, stepped from the start: its LR after each step."""
    import json

    spe = NUM_IMAGE // (BATCH * world_size)
    r = subprocess.run([runs["python"], "-W", "ignore", "-c", SCHEDULE, str(runs["root"]), str(spe), "3", "1",
                        str(steps)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("ranks", [1, 3])
def test_lr_at_resume_is_the_schedules_at_the_same_images_seen(runs, ranks):
    import torch

    state = torch.load(runs[ranks]["probe"] / "checkpoint_gpu_0.pt", weights_only=False)
    spe = NUM_IMAGE // (BATCH * ranks)
    assert (state["epoch"], state["global_step"]) == (2, 2 * spe)  # 2 epochs done, counted on `ranks` ranks
    on_two = schedule(runs, 2, 8)[8]  # the 2-rank run of this job after its 8 steps (2 epochs)
    here = schedule(runs, ranks, 2 * spe)[2 * spe]  # the same job on `ranks` ranks after 2 epochs
    assert on_two == pytest.approx(here, rel=1e-12)
    assert state["last_lr"] == pytest.approx([on_two, on_two], rel=1e-9)
    assert state["group_lr"] == pytest.approx([on_two, on_two], rel=1e-9)
    assert state["state_lr_scheduler"]["last_epoch"] == 2 * spe
    assert state["state_lr_scheduler"]["_step_count"] == 2 * spe + 1
    assert state["state_lr_scheduler"]["total_iters"] == 3 * spe


@pytest.mark.parametrize("ranks", [1, 3])
def test_training_continues_after_resume(runs, ranks):
    import torch

    spe = NUM_IMAGE // (BATCH * ranks)
    rows = [(int(m.group(4)), float(m.group(1)), float(m.group(2)), int(m.group(3)))
            for m in LOSS_LINE.finditer(runs[ranks]["log"])]
    # the recipe's logger skips its first call (it starts its clock there)
    assert [r[0] for r in rows] == list(range(2 * spe + 2, 3 * spe + 1)), runs[ranks]["log"][-2000:]
    assert all(r[3] == 2 for r in rows)  # the third epoch
    assert all(r[1] == r[1] and abs(r[1]) < 1e6 for r in rows)  # finite
    expected = schedule(runs, ranks, 3 * spe)
    for step, _, lr, _ in rows:
        assert lr == pytest.approx(expected[step], abs=1e-6), step  # the log prints 6 decimals
    saved = [torch.load(runs[ranks]["work"] / ck.checkpoint_name(r), weights_only=False) for r in range(ranks)]
    assert all(c["global_step"] == 3 * spe and c["epoch"] == 3 for c in saved)
    assert all(c[ck.META_KEY]["ranks"] == ranks for c in saved)
    # the OTFace step counter went on from the saved one
    assert saved[0]["state_dict_softmax_fc"]["loss.step"].item() == 8 + spe


# ---------------------------------------------------------------------------------------------
# fine-tuning from an exported model.pt (and the merged class centres)
FINETUNE_PROBE = """
import os, runpy, sys
import torch
sys.path.insert(0, os.getcwd())
from otface_plugin.arcface_torch import hooks

init_from = hooks.init_from

def probe(cfg, rank, world_size, backbone, head):
    init_from(cfg, rank, world_size, backbone, head)
    torch.save(head.state_dict(), os.path.join(os.environ["PROBE_DIR"], f"head_{rank}.pt"))

    def first_step(module, args, output):
        torch.save({"input": args[0].detach().clone(), "output": output.detach().clone()},
                   os.path.join(os.environ["PROBE_DIR"], f"first_step_{rank}.pt"))
        handle.remove()

    handle = backbone.register_forward_hook(first_step)

hooks.init_from = probe
sys.argv = ["train_v2.py", *sys.argv[1:]]
runpy.run_path("train_v2.py", run_name="__main__")
"""

FIRST_STEP = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from backbones import get_model
net = get_model("mbf", dropout=0.0, fp16=False, num_features=512)
net.load_state_dict(torch.load(sys.argv[2], map_location="cpu"))
net.train()  # the first step's forward: training mode, as in the job
worst = 0.0
for path in sys.argv[3:]:
    step = torch.load(path)
    with torch.no_grad():
        worst = max(worst, float((net(step["input"]) - step["output"]).abs().max()))
print(worst)
"""


@pytest.fixture(scope="module")
def finetune(runs, tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    root, py = runs["root"], runs["python"]
    (root / "probe_finetune.py").write_text(FINETUNE_PROBE)
    merged = d / "merged.pt"
    ck.write_merged(ck.merge(ck.read_set(runs["saved"])), merged)
    rec = re.search(r"^rec: (.*)$", (root / "configs" / "first.yaml").read_text(), re.M).group(1)
    job = JOB.format(output=d / "out", batch=BATCH, resume="false", rec=rec, num_classes=runs["num_classes"],
                     num_image=2 * 2 * BATCH, epochs=1)
    job += f"init_backbone: {runs['saved'] / 'model.pt'}\ninit_class_centres: {merged}\n"
    (root / "configs" / "finetune.yaml").write_text(job)
    probe = d / "probe"
    probe.mkdir()
    torchrun(py, root, "configs/finetune.yaml", 2, "probe_finetune.py", env={"PROBE_DIR": str(probe)})
    return {"dir": d, "probe": probe, "merged": merged, "job": job, "log": (d / "out" / "training.log").read_text()}


def test_finetune_first_step_embeddings_are_the_exported_models(runs, finetune):
    r = subprocess.run([runs["python"], "-W", "ignore", "-c", FIRST_STEP, str(runs["root"]),
                        str(runs["saved"] / "model.pt"),
                        *(str(finetune["probe"] / f"first_step_{rank}.pt") for rank in (0, 1))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) < 1e-5
    assert "otface-plugin: fine-tuning from init_backbone" in finetune["log"]
    assert LOSS_LINE.search(finetune["log"])  # and it trains


def test_finetune_starts_from_the_merged_class_centres(runs, finetune):
    import torch

    merged = torch.load(finetune["merged"], weights_only=False)
    key, full = merged["centre_key"], merged["checkpoint"]["state_dict_softmax_fc"][merged["centre_key"]]
    for rank in (0, 1):
        start, n = ck.shard_range(runs["num_classes"], 2, rank)
        head = torch.load(finetune["probe"] / f"head_{rank}.pt")
        assert torch.equal(head[key], full[start:start + n])
        assert head["loss.step"].item() == 0  # a new job: the OTFace state starts afresh


OTHER_BACKBONE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from backbones import get_model
torch.save(get_model("r18", dropout=0.0, fp16=False, num_features=512).state_dict(), sys.argv[2])
"""


def test_finetune_refuses_another_backbones_state_dict_in_one_line(runs, finetune, tmp_path):
    py = runs["python"]
    r = subprocess.run([py, "-W", "ignore", "-c", OTHER_BACKBONE, str(runs["root"]), str(tmp_path / "r18.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pristine = copy_upstream(tmp_path / "pristine")
    job = finetune["job"].replace(str(runs["saved"] / "model.pt"), str(tmp_path / "r18.pt"))
    job = job.replace(f"output: {finetune['dir'] / 'out'}", f"output: {tmp_path / 'out'}")
    (pristine / "configs" / "wrong.yaml").write_text(job)
    env = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           "-m", "otface_plugin.arcface_torch.train_wrapper", "--arcface-root", str(pristine), "configs/wrong.yaml"]
    r = subprocess.run(cmd, cwd=pristine, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("otface-train:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"otface-train: error: {tmp_path / 'r18.pt'}: not a state dict of the mbf backbone: "
                               "missing keys"), lines[0]
    assert "unexpected keys" in lines[0]


# ---------------------------------------------------------------------------------------------
# precision: bf16 on the CPU fallback (CPU autocast in bfloat16; the same key runs CUDA's)
BF16_PROBE = """
import json, os, runpy, sys
import torch
sys.path.insert(0, os.getcwd())
from otface_plugin.arcface_torch import hooks

set_precision = hooks.set_precision

def probe(cfg, backbone, head):
    set_precision(cfg, backbone, head)
    seen = set()
    layers = [m for m in backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def record(module, args, output):
        seen.add(str(output.dtype))

    def done(module, args, output):
        rank = torch.distributed.get_rank()
        with open(os.path.join(os.environ["PROBE_DIR"], f"dtypes_{rank}.json"), "w") as f:
            json.dump({"layers": sorted(seen), "embeddings": str(output.dtype)}, f)
        for h in handles:
            h.remove()

    handles = [m.register_forward_hook(record) for m in layers] + [backbone.register_forward_hook(done)]

hooks.set_precision = probe
sys.argv = ["train_v2.py", *sys.argv[1:]]
runpy.run_path("train_v2.py", run_name="__main__")
"""
BF16_STEPS = 16  # per epoch on 2 ranks


@pytest.fixture(scope="module")
def bf16(runs, tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    root, py = runs["root"], runs["python"]
    (root / "probe_bf16.py").write_text(BF16_PROBE)
    rec = re.search(r"^rec: (.*)$", (root / "configs" / "first.yaml").read_text(), re.M).group(1)

    def job(resume, epochs):
        text = JOB.format(output=d / "out", batch=BATCH, resume=resume, rec=rec, num_classes=runs["num_classes"],
                          num_image=BF16_STEPS * 2 * BATCH, epochs=epochs)
        # test_recipe_train.py's end-to-end settings (AdamW, the default lambda), whose loss falls in 32 steps
        for a, b in (("fp16: false\n", "precision: bf16\n"), ("otface:\n  lambda_ot: auto\n", ""),
                     ("optimizer: sgd\nlr: 0.1\n", "optimizer: adamw\nlr: 0.001\nweight_decay: 0.1\n"),
                     ("warmup_epoch: 1\n", "warmup_epoch: 0\n")):
            assert a in text
            text = text.replace(a, b)
        (root / "configs" / "bf16.yaml").write_text(text)
        return "configs/bf16.yaml"

    probe = d / "probe"
    probe.mkdir()
    first = torchrun(py, root, job("false", 2), 2, "probe_bf16.py", env={"PROBE_DIR": str(probe)})
    log_first = (d / "out" / "training.log").read_text()
    second = torchrun(py, root, job("true", 3), 2, "train_v2.py")
    log_all = (d / "out" / "training.log").read_text()
    return {"out": d / "out", "probe": probe, "log_first": log_first, "log_resumed": log_all[len(log_first):],
            "stderr": first.stderr + second.stderr}


def test_bf16_runs_the_backbone_in_bfloat16_and_trains(bf16):
    import json

    for rank in (0, 1):
        seen = json.loads((bf16["probe"] / f"dtypes_{rank}.json").read_text())
        assert "torch.bfloat16" in seen["layers"], seen  # the autocast region
        assert seen["embeddings"] == "torch.float32", seen  # mbf's conv_sep, outside it as upstream's fp16
    assert "precision bf16: cpu autocast in bfloat16" in bf16["log_first"]
    rows = [(int(m.group(4)), float(m.group(1))) for m in LOSS_LINE.finditer(bf16["log_first"])]
    assert [r[0] for r in rows] == list(range(2, 2 * BF16_STEPS + 1)), bf16["log_first"][-2000:]
    losses = [r[1] for r in rows]
    assert all(x == x and abs(x) < 1e6 for x in losses), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert "Fp16 Grad Scale" not in bf16["log_first"]  # no GradScaler
    print("bf16 2-rank run, losses:", losses)


def test_bf16_checkpoint_resumes(bf16):
    info = ck.describe(ck.read_set(bf16["out"]))
    assert (info["precision"], info["ranks"], info["epoch"], info["global_step"]) == ("bf16", 2, 3, 3 * BF16_STEPS)
    rows = [(int(m.group(4)), float(m.group(1))) for m in LOSS_LINE.finditer(bf16["log_resumed"])]
    assert [r[0] for r in rows] == list(range(2 * BF16_STEPS + 2, 3 * BF16_STEPS + 1)), bf16["log_resumed"][-2000:]
    assert all(r[1] == r[1] for r in rows)

"""The margin heads in the patched recipe: 2 processes (gloo, CPU), mbf on the Extended Yale B
.rec, 32 steps, then resumed for 16 more. ``loss: adaface`` (PartialFC_V2 with AdaFace's
margin) and ``loss: otface`` with ``otface.margin: curricularface``. The heads' running buffers
must be in every rank's checkpoint, equal across ranks, and continue after the resume."""
import re

import pytest
import torch
from conftest import copy_upstream
from test_recipe_train import FACES, data, needs_upstream, step_losses, torchrun  # noqa: F401

from otface_plugin.arcface_torch import installer

pytestmark = [
    pytest.mark.upstream,
    pytest.mark.slow,
    needs_upstream,
    pytest.mark.skipif(not FACES.is_dir(), reason=f"face images not found at {FACES} (set OTFACE_FACES_DIR)"),
]

JOB = """
network: mbf
output: null
batch_size: 16
optimizer: adamw
lr: 0.001
weight_decay: 0.1
fp16: false
verbose: 100000
frequent: 1
num_workers: 1
save_all_states: true
resume: {resume}
rec: {rec}
num_classes: {num_classes}
num_image: 512
num_epoch: {epochs}
warmup_epoch: 0
val_targets: []
"""
HEADS = {
    "adaface": "loss: adaface\nsampler: pk\nnum_instances: 4\n",  # pk: 16 steps per epoch as num_image says
    "otface_curricular": "loss: otface\nnum_instances: 4\notface:\n  layer: conv_sep\n  margin: curricularface\n",
}


def buffers(out, world=2):
    states = []
    for rank in range(world):
        ckpt = torch.load(out / f"checkpoint_gpu_{rank}.pt", map_location="cpu", weights_only=False)
        states.append({k: v for k, v in ckpt["state_dict_softmax_fc"].items() if "margin_softmax." in k})
    return states


@pytest.fixture(scope="module", params=sorted(HEADS))
def head_run(request, tmp_path_factory, data, train_python):  # noqa: F811
    name = request.param
    root = copy_upstream(tmp_path_factory.mktemp(name) / "arcface_torch")
    installer.install(root)
    cfg = root / "configs" / f"e2e_{name}.yaml"
    out = root / "work_dirs" / f"e2e_{name}"
    cfg.write_text(HEADS[name] + JOB.format(resume="false", rec=data["rec"], num_classes=data["num_classes"], epochs=2))
    torchrun(train_python, root, f"configs/e2e_{name}.yaml", 2, 900)
    log_first = (out / "training.log").read_text()
    first = buffers(out)
    cfg.write_text(HEADS[name] + JOB.format(resume="true", rec=data["rec"], num_classes=data["num_classes"], epochs=3))
    torchrun(train_python, root, f"configs/e2e_{name}.yaml", 2, 600)
    log_all = (out / "training.log").read_text()
    return {"name": name, "log_first": log_first, "log_resumed": log_all[len(log_first):],
            "first": first, "resumed": buffers(out)}


def test_trains_32_steps_and_the_loss_falls(head_run):
    rows = step_losses(head_run["log_first"])
    steps = [s for s, _ in rows]
    assert steps == list(range(steps[0], 33)) and steps[0] <= 2, steps  # 2 epochs x 16 steps
    losses = [float(v) for _, v in rows]
    assert all(v == v and abs(v) < 1e6 for v in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{head_run['name']}: loss first-5 mean {first:.4f}, last-5 mean {last:.4f}")
    assert last < first
    if head_run["name"].startswith("otface"):
        assert re.search(r"OTFace   Global Step: 32 ", head_run["log_first"])


def test_running_buffers_are_checkpointed_equal_on_ranks_and_continue(head_run):
    first, resumed = head_run["first"], head_run["resumed"]
    assert first[0], "no margin buffers in state_dict_softmax_fc"
    for states in (first, resumed):
        for key, value in states[0].items():
            torch.testing.assert_close(states[1][key], value)  # synchronised across ranks
    rows = step_losses(head_run["log_resumed"])
    assert rows and rows[0][0] > 32 and rows[-1][0] == 48, rows  # the resumed run continued the step count
    if head_run["name"] == "adaface":
        key = next(k for k in first[0] if k.endswith("batch_std"))
        s1, s2 = float(first[0][key]), float(resumed[0][key])
        # t_alpha 0.01 from 100: ~100 * 0.99^32 = 72 after 32 steps, ~0.99^48 = 62 after 48;
        # a run restarted at the defaults would be back near 100 * 0.99^16 = 85
        print(f"adaface batch_std {s1:.2f} -> {s2:.2f}")
        assert s2 < s1 - 5
    else:
        key = next(k for k in first[0] if k.endswith(".t"))
        t1, t2 = float(first[0][key]), float(resumed[0][key])
        # t is an EMA (0.01) of the mean target cosine from 0: it keeps growing only if resumed
        print(f"curricularface t {t1:.4f} -> {t2:.4f}")
        assert t1 > 0 and t2 > t1

"""Checkpoint sets: merge and re-split PartialFC_V2's class-centre shards (synthetic sets)."""
import itertools
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from otface_plugin.arcface_torch import checkpoint as ck

D = 6


def full_state(num_classes, optimizer="sgd", seed=0):
    """A job's state as if on one rank: backbone, OTFace head (centres under loss.head.), optimizer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_classes, D, generator=g)
    backbone = {"conv.weight": torch.randn(4, 3, generator=g), "bn.running_mean": torch.randn(4, generator=g),
                "bn.num_batches_tracked": torch.tensor(12)}
    head = {"loss.head.weight": w, "loss.step": torch.tensor(24), "loss.lambda_auto": torch.tensor(0.37),
            "loss.grad_stats": torch.randn(4, generator=g)}
    if optimizer == "sgd":
        per = lambda shape: {"momentum_buffer": torch.randn(*shape, generator=g)}  # noqa: E731
        extra = dict(momentum=0.9, dampening=0, nesterov=False)
    else:
        per = lambda shape: {"step": torch.tensor(24.0), "exp_avg": torch.randn(*shape, generator=g),  # noqa: E731
                             "exp_avg_sq": torch.rand(*shape, generator=g)}
        extra = dict(betas=(0.9, 0.999), eps=1e-8, amsgrad=False)
    state = {0: per((4, 3)), 1: per((4,)), 2: per((num_classes, D))}
    groups = [{"lr": 0.05, "weight_decay": 5e-4, **extra, "initial_lr": 0.1, "params": [0, 1]},
              {"lr": 0.05, "weight_decay": 5e-4, **extra, "initial_lr": 0.1, "params": [2]}]
    return backbone, head, {"state": state, "param_groups": groups}


def make_set(directory, num_classes, world_size, optimizer="sgd", meta=True, seed=0):
    """What train_v2.py saves on ``world_size`` ranks; rank r's BatchNorm buffer differs (DDP
    does not broadcast buffers)."""
    backbone, head, opt = full_state(num_classes, optimizer, seed)
    os.makedirs(directory, exist_ok=True)
    shards = []
    for rank in range(world_size):
        start, n = ck.shard_range(num_classes, world_size, rank)
        b = dict(backbone, **{"bn.running_mean": backbone["bn.running_mean"] + rank})
        h = dict(head, **{"loss.head.weight": head["loss.head.weight"][start:start + n].clone()})
        state = {k: dict(v) for k, v in opt["state"].items()}
        state[2] = {k: (v[start:start + n].clone() if v.dim() == 2 else v) for k, v in state[2].items()}
        c = {"epoch": 2, "global_step": 8, "state_dict_backbone": b, "state_dict_softmax_fc": h,
             "state_optimizer": {"state": state, "param_groups": [dict(g) for g in opt["param_groups"]]},
             "state_lr_scheduler": {"last_epoch": 8, "total_iters": 12, "warmup_iters": 0}}
        if meta:
            c[ck.META_KEY] = {"ranks": world_size, "step_world_size": world_size, "batch_size": 16,
                              "precision": "fp32"}
        torch.save(c, os.path.join(directory, ck.checkpoint_name(rank)))
        shards.append(c)
    return shards


def assert_same(a, b, where=""):
    assert type(a) is type(b) or (torch.is_tensor(a) and torch.is_tensor(b)), where
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_merge_then_split_restores_every_shard_and_resplit_keeps_the_full_matrices(tmp_path, optimizer):
    C = 11  # uneven over 2, 3 and 4 ranks
    full_w = full_state(C, optimizer)[1]["loss.head.weight"]
    moments = [k for k in full_state(C, optimizer)[2]["state"][2] if k != "step"]
    for n, m in itertools.product(range(1, 5), range(1, 5)):
        saved = make_set(tmp_path / f"{optimizer}{n}", C, n, optimizer)
        merged = ck.merge(ck.read_set(tmp_path / f"{optimizer}{n}"))
        assert torch.equal(merged["checkpoint"]["state_dict_softmax_fc"]["loss.head.weight"], full_w)
        for rank, shard in enumerate(ck.split(merged, n)):  # split(merge(set)) is the set
            assert_same(shard, saved[rank], f"N={n} rank {rank}")
        resplit = ck.split(merged, m)
        for rank, shard in enumerate(resplit):
            start, k = ck.shard_range(C, m, rank)
            assert shard["state_dict_softmax_fc"]["loss.head.weight"].shape == (k, D)
            # a rank that was saved keeps its own BatchNorm buffer, a new one gets rank 0's
            assert torch.equal(shard["state_dict_backbone"]["bn.running_mean"],
                               saved[rank if rank < n else 0]["state_dict_backbone"]["bn.running_mean"])
            assert shard["global_step"] == 8 and shard["epoch"] == 2
            assert shard["state_dict_softmax_fc"]["loss.step"].item() == 24
            assert shard["state_dict_softmax_fc"]["loss.lambda_auto"].item() == pytest.approx(0.37)
        ck.write_set(resplit, tmp_path / f"re{optimizer}{n}{m}")
        again = ck.merge(ck.read_set(tmp_path / f"re{optimizer}{n}{m}"))
        assert again["ranks"] == m and again["step_world_size"] == n  # its steps still count on n ranks
        body, body0 = again["checkpoint"], merged["checkpoint"]
        assert torch.equal(body["state_dict_softmax_fc"]["loss.head.weight"], full_w)
        for name in moments:
            assert torch.equal(body["state_optimizer"]["state"][2][name], body0["state_optimizer"]["state"][2][name])
        assert_same(body["state_optimizer"]["state"][0], body0["state_optimizer"]["state"][0])
        assert_same(body["state_dict_backbone"], body0["state_dict_backbone"])


def test_set_without_meta_is_counted_from_the_files(tmp_path):
    make_set(tmp_path, 7, 3, meta=False)
    s = ck.read_set(tmp_path, num_classes=7)
    assert s.ranks == 3 and s.step_world_size == 3
    assert ck.saved_layout(tmp_path) == (3, 3)


def test_stale_files_of_a_larger_earlier_run_are_not_part_of_a_set(tmp_path):
    make_set(tmp_path, 9, 4, seed=1)
    make_set(tmp_path, 9, 2, seed=2)  # files 2 and 3 are left from the 4-rank save
    assert ck.read_set(tmp_path).ranks == 2
    assert ck.saved_layout(tmp_path) == (2, 2)


def error_of(fn, *args, **kwargs):
    with pytest.raises(ck.CheckpointError) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_shard_is_an_error_naming_it(tmp_path):
    make_set(tmp_path, 9, 3)
    os.unlink(tmp_path / "checkpoint_gpu_1.pt")
    assert error_of(ck.read_set, tmp_path).startswith(f"{tmp_path / 'checkpoint_gpu_1.pt'}: missing")
    os.unlink(tmp_path / "checkpoint_gpu_0.pt")
    assert "checkpoint_gpu_0.pt: missing" in error_of(ck.read_set, tmp_path)


def test_missing_last_shard_without_meta_is_caught_by_the_class_count(tmp_path):
    make_set(tmp_path, 9, 3, meta=False)
    os.unlink(tmp_path / "checkpoint_gpu_2.pt")
    msg = error_of(ck.read_set, tmp_path, num_classes=9)
    assert "checkpoint_gpu_0.pt" in msg and "num_classes 9" in msg


def test_shard_of_another_save_is_an_error_naming_it(tmp_path):
    make_set(tmp_path, 9, 3)
    other = torch.load(tmp_path / "checkpoint_gpu_2.pt", weights_only=False)
    other["global_step"] = 4
    torch.save(other, tmp_path / "checkpoint_gpu_2.pt")
    msg = error_of(ck.read_set, tmp_path)
    assert msg.startswith(f"{tmp_path / 'checkpoint_gpu_2.pt'}: a shard of another save")


def test_shard_of_another_backbone_or_layout_is_an_error_naming_it(tmp_path):
    make_set(tmp_path, 9, 2)
    c = torch.load(tmp_path / "checkpoint_gpu_1.pt", weights_only=False)
    c["state_dict_backbone"]["conv.weight"] = torch.zeros(5, 3)
    torch.save(c, tmp_path / "checkpoint_gpu_1.pt")
    assert "checkpoint_gpu_1.pt: state_dict_backbone.conv.weight has shape" in error_of(ck.read_set, tmp_path)
    make_set(tmp_path, 9, 2)
    c = torch.load(tmp_path / "checkpoint_gpu_1.pt", weights_only=False)
    c["state_dict_softmax_fc"]["loss.head.weight"] = torch.zeros(5, D)  # rank 1 of 2 holds 4 of 9
    torch.save(c, tmp_path / "checkpoint_gpu_1.pt")
    assert "checkpoint_gpu_1.pt: optimizer momentum_buffer of 4 class centres beside 5" in error_of(ck.read_set, tmp_path)
    c["state_dict_softmax_fc"]["loss.head.weight"] = torch.zeros(3, D)
    c["state_optimizer"]["state"][2]["momentum_buffer"] = torch.zeros(3, D)
    torch.save(c, tmp_path / "checkpoint_gpu_1.pt")
    msg = error_of(ck.read_set, tmp_path)
    assert "(centres per rank: 5, 3): a shard of another layout" in msg
    assert "num_classes 9" in error_of(ck.read_set, tmp_path, num_classes=9)


def test_unreadable_file_is_an_error_naming_it(tmp_path):
    make_set(tmp_path, 9, 2)
    (tmp_path / "checkpoint_gpu_1.pt").write_bytes(b"not a checkpoint")
    assert error_of(ck.read_set, tmp_path).startswith(f"{tmp_path / 'checkpoint_gpu_1.pt'}: not a readable")
    torch.save({"epoch": 1}, tmp_path / "checkpoint_gpu_1.pt")
    assert "checkpoint_gpu_1.pt: not a train_v2.py checkpoint" in error_of(ck.read_set, tmp_path)


def test_split_refuses_more_ranks_than_classes(tmp_path):
    make_set(tmp_path, 3, 1)
    assert "more than the 3 classes" in error_of(ck.split, ck.merge(ck.read_set(tmp_path)), 4)


def test_map_step_keeps_the_epochs_done():
    cfg = SimpleNamespace(num_image=128, batch_size=16)
    # 2 ranks: 4 steps an epoch; 3 ranks: 2 (128 // 48); 1 rank: 8
    assert ck.map_step(8, 2, 3, cfg) == 4
    assert ck.map_step(8, 2, 1, cfg) == 16
    assert ck.map_step(4, 3, 2, cfg) == 8
    assert ck.map_step(8, 2, 2, cfg) == 8


def cli(*args):
    return subprocess.run([sys.executable, "-m", "otface_plugin.arcface_torch.checkpoint", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_show_merge_split(tmp_path):
    make_set(tmp_path / "run", 11, 2, optimizer="adamw")
    r = cli("show", tmp_path / "run", "--json")
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    assert (info["ranks"], info["classes"], info["global_step"], info["epoch"], info["embedding_size"],
            info["precision"]) == (2, 11, 8, 2, D, "fp32")
    r = cli("merge", tmp_path / "run", tmp_path / "merged.pt")
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "merged.pt").read_bytes()
    r = cli("merge", tmp_path / "run", tmp_path / "merged.pt")  # no overwrite without --force
    assert r.returncode == 2 and r.stderr.strip() == f"otface-ckpt: {tmp_path / 'merged.pt'}: exists (use --force to overwrite)"
    assert (tmp_path / "merged.pt").read_bytes() == before
    r = cli("split", tmp_path / "merged.pt", tmp_path / "three", "--world-size", 3)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == [f"checkpoint_gpu_{i}.pt" for i in range(3)]
    r = cli("split", tmp_path / "merged.pt", tmp_path / "three", "--world-size", 3)
    assert r.returncode == 2 and "checkpoint_gpu_0.pt: exists" in r.stderr
    r = cli("split", tmp_path / "merged.pt", tmp_path / "three", "--world-size", 3, "--force")
    assert r.returncode == 0, r.stderr
    r = cli("show", tmp_path / "three")
    assert r.returncode == 0 and "ranks            3" in r.stdout
    r = cli("split", tmp_path / "run" / "checkpoint_gpu_0.pt", tmp_path / "x", "--world-size", 2)
    assert r.returncode == 2 and "not a merged checkpoint" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_cli_num_classes_tells_a_missing_last_shard_of_an_upstream_set(tmp_path):
    make_set(tmp_path, 9, 3, meta=False)
    os.unlink(tmp_path / "checkpoint_gpu_2.pt")
    assert cli("show", tmp_path).returncode == 0  # 2 files of 3 rows: a layout of their own
    r = cli("merge", tmp_path, tmp_path / "m.pt", "--num-classes", 9)
    assert r.returncode == 2 and "num_classes 9" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()

"""OTFace under DistributedDataParallel on CPU (gloo, 2 processes): the per-rank OT term and
the layer4 hook work through DDP, and DDP's gradients are the mean of the ranks' local ones."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from otface_plugin.features import FeatureCapture
from otface_plugin.losses import OTFaceLoss
from conftest import free_port
from helpers import TinyBackbone


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = TinyBackbone(dim=16, widths=(8, 16))
    local = copy.deepcopy(net)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    cap_ddp, cap_local = FeatureCapture(ddp, "layer4"), FeatureCapture(local, "layer4")
    # labels 0..3 on rank 0 and 4..7 on rank 1: the identities a P x K sampler puts on each rank
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.arange(4 * rank, 4 * rank + 4).repeat_interleave(2)
    loss_fn = OTFaceLoss(num_classes=8, embedding_size=16, lambda_ot=1.0, s=8.0, term_options=dict(triplet_mode="all"))
    loss_local = copy.deepcopy(loss_fn)

    loss = loss_fn(ddp(images), labels, features=cap_ddp.pop())
    loss.backward()
    ref = loss_local(local(images), labels, features=cap_local.pop())
    ref.backward()
    grads = torch.cat([p.grad.flatten() for p in local.parameters()])
    dist.all_reduce(grads)
    ddp_grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    out[rank] = {
        "finite": bool(torch.isfinite(loss)),
        "triplets": loss_fn.components()["triplets"],
        "ot": loss_fn.components()["ot"],
        "max_diff": float((ddp_grads - grads / world).abs().max()),
        "grad_norm": float(ddp_grads.norm()),
    }
    dist.destroy_process_group()


@pytest.mark.slow
def test_otface_under_ddp_gloo():
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), out), nprocs=world, join=True)
        results = dict(out)
    for rank in range(world):
        r = results[rank]
        assert r["finite"] and r["triplets"] == 8 and r["ot"] > 0
        assert r["grad_norm"] > 0 and r["max_diff"] < 1e-5, r

"""Training-step cost of the OT term: backbone + margin head, with and without OTFace.

One step = forward + backward of a ResNet-50-sized face backbone at 112 x 112 (improved
residual units as in ArcFace, stages [3, 4, 14, 3], layer4 = 512 x 7 x 7, 512-d embedding) and
a margin softmax head; "otface" adds the OT term on the layer4 maps of the same batch. The two
variants alternate step by step on the same batch so that machine noise hits both alike; the
table gives medians and the ratio.

    python benchmarks/bench_step.py [--P 2 --K 4] [--steps 5] [--device cpu] [--fp16] [--json out.json]

``--backbone upstream`` uses the recipe's own iresnet50 instead (ARCFACE_TORCH_DIR, else the
pinned export at ../shared/upstream/<pins.SHARED_EXPORT>). On a GPU the recipe's batch (128
per GPU, P=32 x K=4) with ``--fp16`` (the recipe's autocast, as ``fp16: true``) is the
meaningful one:

    python benchmarks/bench_step.py --device cuda --backbone upstream --P 32 --K 4 --fp16 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

from otface_plugin.arcface_torch.pins import SHARED_EXPORT
from otface_plugin.features import FeatureCapture
from otface_plugin.losses import MarginSoftmaxLoss, OTFaceLoss
from otface_plugin.losses.grad_share import GradShareProbe


class IRBlock(nn.Module):
    """BN-conv-BN-PReLU-conv(stride)-BN with a projection shortcut when the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet50Like(nn.Module):
    def __init__(self, layers=(3, 4, 14, 3), widths=(64, 128, 256, 512), embedding_size=512):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        stages, cin = [], 64
        for n, w in zip(layers, widths):
            blocks = [IRBlock(cin, w, 2)] + [IRBlock(w, w, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


SHARED_UPSTREAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "upstream",
                               SHARED_EXPORT)


def upstream_r50(fp16=False):
    root = os.environ.get("ARCFACE_TORCH_DIR") or SHARED_UPSTREAM
    if not os.path.isfile(os.path.join(root, "backbones", "__init__.py")):
        raise SystemExit(f"--backbone upstream needs an arcface_torch checkout: set ARCFACE_TORCH_DIR (tried {root})")
    sys.path.insert(0, root)
    from backbones import get_model  # the recipe's own factory, imported, not copied
    # fp16=True: the recipe's iresnet runs its body under autocast itself (train_v2.py, fp16: true)
    return get_model("r50", dropout=0.0, fp16=fp16, num_features=512)


PROBE_CALLS = 200


def time_probe_alone(shape, device) -> float:
    """Median seconds of the probe's work in one step, apart from the step's own noise: attach
    (a view, two hook registrations) and the two hooks run on gradients of ``F``'s shape."""
    stats = torch.zeros(4, device=device)
    probe = GradShareProbe()
    probe.stats = stats
    leaf = torch.randn(shape, device=device, requires_grad=True)
    grad_ot, grad_total = torch.randn(shape, device=device), torch.randn(shape, device=device)
    lam = torch.tensor(0.1, device=device)
    times = []
    for _ in range(PROBE_CALLS + 10):
        features = leaf * 1.0  # a fresh non-leaf F each call, as each step's backbone output is
        t = time.perf_counter()
        probe.attach(features, lam)
        probe._keep_ot_grad(grad_ot)
        probe._split(grad_total)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[10:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--P", type=int, default=2, help="identities per batch")
    p.add_argument("--K", type=int, default=4, help="images per identity")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", choices=["builtin", "upstream"], default="builtin")
    p.add_argument("--fp16", action="store_true", help="fp16 autocast for the backbone, as the recipe's fp16: true")
    p.add_argument("--ot-compile", default="none", choices=["none", "compile", "cudagraph"],
                   help="OTFace option ot_compile")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    net = (IResNet50Like() if args.backbone == "builtin" else upstream_r50(args.fp16)).to(device)
    capture = FeatureCapture(net, "layer4")
    head = MarginSoftmaxLoss(args.classes, 512).to(device)
    term = dict(triplet_mode="all", ot_compile=args.ot_compile)
    otface = OTFaceLoss(head=head, lambda_ot=0.1, term_options=term).to(device)
    # the same loss without the gradient-share probe (its two tensor hooks and three reductions per step)
    unprobed = OTFaceLoss(head=head, lambda_ot=0.1, term_options=term,
                          probe_options=dict(measure_grad_share=False)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                              enabled=args.fp16 and args.backbone == "builtin")
    B = args.P * args.K
    images = torch.randn(B, 3, 112, 112, device=device)
    labels = torch.arange(args.P, device=device).repeat_interleave(args.K)
    params = sum(p.numel() for p in net.parameters()) / 1e6

    feature_shape = []  # of F, the layer4 map the OT term reads (for the probe's own timing)

    def step(variant):
        net.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        with autocast:
            emb = net(images)
        emb = emb.float()
        feats = capture.pop()
        feature_shape[:] = feats.shape
        if variant == "margin":
            loss = head(emb, labels)
        else:
            loss = (otface if variant == "otface" else unprobed)(emb, labels, features=feats)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {"margin": [], "otface": [], "otface-noprobe": []}
    for v in times:  # warm-up
        step(v)
    for _ in range(args.steps):
        for v in times:
            t = time.perf_counter()
            step(v)
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    triplets = int(otface.components()["triplets"])
    probe_alone = time_probe_alone(tuple(feature_shape), device)
    print(f"\n{args.backbone} backbone ({params:.1f} M parameters), batch {B} = {args.P} x {args.K} at 112x112, "
          f"{triplets} triplets of 49x49 layer4 descriptors, device={args.device}, fp16 autocast {args.fp16}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} alternating steps")
    print(f"{'variant':<22} {'median s/step':>14} {'ratio':>7}")
    print("-" * 45)
    print(f"{'margin softmax':<22} {med['margin']:>14.3f} {1.0:>7.3f}")
    print(f"{'margin + OT (OTFace)':<22} {med['otface']:>14.3f} {med['otface'] / med['margin']:>7.3f}")
    print(f"{'  without share probe':<22} {med['otface-noprobe']:>14.3f} {med['otface-noprobe'] / med['margin']:>7.3f}")
    ratio = med["otface"] / med["margin"]
    probe = med["otface"] / med["otface-noprobe"]
    probe_share = probe_alone / med["otface"]
    print(f"\nOT term adds {100 * (ratio - 1):+.1f}% to the step (target <= +3% on a GPU at 32 x 4, fp16); "
          f"the gradient-share probe, which runs every step, {100 * (probe - 1):+.2f}% (step against step)")
    print(f"the probe's own work (attach and its two hooks on a gradient of F's shape {tuple(feature_shape)}, "
          f"median of {PROBE_CALLS} calls): {1e3 * probe_alone:.3f} ms = {100 * probe_share:.3f}% of the OTFace "
          f"step (target < 1%)")
    if args.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device_name": name, "torch": torch.__version__, "batch": B,
                       "triplets": triplets, "median_s": med, "ratio": ratio, "probe_ratio": probe,
                       "probe_alone_s": probe_alone, "probe_share_of_step": probe_share}, f, indent=2)


if __name__ == "__main__":
    main()

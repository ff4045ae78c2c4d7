"""A short OTFace training on synthetic identities, for a first look without any dataset.

Each synthetic identity is a smooth random 3 x 32 x 32 pattern; its images are shifted, re-lit
and noisy copies. A small CNN with a ``layer4`` conv stage (like arcface_torch's iresnet) is
trained with P x K batches, printing the loss components; at the end, verification accuracy on
held-out identities is reported. This is the plugin used in a user's own training loop.

    otface-demo --steps 150 --loss otface
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

from otface_plugin import available_losses, build_loss
from otface_plugin.cli_output import run_cli
from otface_plugin.features import FeatureCapture
from otface_plugin.mining import NonFiniteError

IMAGE = 32


class SmallFaceNet(torch.nn.Module):
    """Four conv stages and a linear embedding, named like iresnet so FeatureCapture finds layer4."""

    def __init__(self, embedding_size: int = 64, width: int = 16) -> None:
        super().__init__()

        def stage(cin, cout):
            return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                                       torch.nn.BatchNorm2d(cout), torch.nn.PReLU(cout))

        self.layer1 = stage(3, width)
        self.layer2 = stage(width, width * 2)
        self.layer3 = stage(width * 2, width * 4)
        self.layer4 = stage(width * 4, width * 8)  # 2 x 2 map at 32 x 32 input
        self.fc = torch.nn.Linear(width * 8 * 4, embedding_size)
        self.features = torch.nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(x.flatten(1)))


class SyntheticFaces:
    """Identities as smooth random patterns; images as jittered, re-lit, noisy views."""

    def __init__(self, num_identities: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(num_identities, 3, 6, 6, generator=g)
        self.prototypes = F.interpolate(coarse, size=(IMAGE + 8, IMAGE + 8), mode="bicubic", align_corners=False)
        self.num_identities = num_identities

    def images(self, ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = ids.numel()
        dx = torch.randint(0, 9, (n,), generator=g)
        dy = torch.randint(0, 9, (n,), generator=g)
        crops = torch.stack([self.prototypes[i, :, y:y + IMAGE, x:x + IMAGE]
                             for i, x, y in zip(ids.tolist(), dx.tolist(), dy.tolist())])
        gain = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        return gain * crops + 0.7 * torch.randn(crops.shape, generator=g)


def pk_batches(data: SyntheticFaces, identities: torch.Tensor, P: int, K: int,
               seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless P identities x K images batches; labels are positions in ``identities``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        pick = torch.randperm(identities.numel(), generator=g)[:P]
        labels = pick.repeat_interleave(K)
        yield data.images(identities[labels], g), labels


@torch.no_grad()
def verification_accuracy(net, data: SyntheticFaces, identities: torch.Tensor, pairs: int, seed: int) -> float:
    """Best-threshold accuracy on balanced same/different pairs of held-out identities."""
    g = torch.Generator().manual_seed(seed)
    a = identities[torch.randint(0, identities.numel(), (pairs,), generator=g)]
    other = identities[torch.randint(0, identities.numel(), (pairs,), generator=g)]
    same = torch.arange(pairs) % 2 == 0
    other = torch.where(same, a, other)
    same = a == other
    net.eval()
    e1 = F.normalize(net(data.images(a, g)))
    e2 = F.normalize(net(data.images(other, g)))
    net.train()
    sims = (e1 * e2).sum(1)
    best = 0.0
    for t in sims.sort().values:
        best = max(best, ((sims >= t) == same).float().mean().item())
    return best


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    data = SyntheticFaces(args.identities + args.held_out, seed=args.seed)
    train_ids = torch.arange(args.identities)
    test_ids = torch.arange(args.identities, args.identities + args.held_out)
    net = SmallFaceNet(args.embedding_size)
    capture = FeatureCapture(net, "layer4")
    options = dict(num_classes=args.identities, embedding_size=args.embedding_size, s=args.scale)
    if args.loss == "otface":
        options.update(lambda_ot=args.lambda_ot, warmup_steps=args.steps // 10)
    try:
        loss_fn = build_loss(args.loss, **options)
    except (TypeError, ValueError) as exc:  # a registered loss that takes other options
        raise DemoError(f"loss {args.loss!r} cannot be built from the demo's options: {exc}") from None
    opt = torch.optim.SGD(list(net.parameters()) + list(loss_fn.parameters()), lr=args.lr, momentum=0.9,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.steps)
    print(f"otface-demo: loss={args.loss}, {args.identities} train / {args.held_out} held-out synthetic identities, "
          f"batch {args.P}x{args.K}, {args.steps} steps")
    before = verification_accuracy(net, data, test_ids, args.pairs, args.seed + 1)
    start = time.perf_counter()
    batches = pk_batches(data, train_ids, args.P, args.K, args.seed)
    for step in range(1, args.steps + 1):
        images, labels = next(batches)
        emb = net(images)
        if args.loss == "otface":
            loss = loss_fn(emb, labels, features=capture.pop())
        else:
            capture.pop()
            loss = loss_fn(emb, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise DemoError(f"loss became {loss.item()} at step {step}; try a lower --lr")
        if step % args.log_every == 0 or step == 1:
            if args.loss == "otface":
                c = loss_fn.components()
                print(f"step {step:4d}  loss {c['loss']:7.3f}  margin {c['margin']:7.3f}  ot {c['ot']:.4f}  "
                      f"lambda {c['lambda']:.3f}  hard triplets {int(c['triplets']):3d}  "
                      f"W(a,p) {c['w_ap']:.4f}  W(a,n) {c['w_an']:.4f}")
            else:
                print(f"step {step:4d}  loss {loss.item():7.3f}")
    elapsed = time.perf_counter() - start
    after = verification_accuracy(net, data, test_ids, args.pairs, args.seed + 1)
    print(f"held-out verification accuracy: {before:.3f} before training -> {after:.3f} after "
          f"({elapsed:.1f} s, {1000 * elapsed / args.steps:.1f} ms/step)")
    return {"accuracy_before": before, "accuracy_after": after, "seconds": elapsed}


class DemoError(Exception):
    """An expected failure: reported as one line, exit status 1."""


def _usage_error(message: str):
    # one line, no usage dump: the option is named in the message
    print(f"otface-demo: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="otface-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="otface", help="registered loss name (otface, arcface, cosface)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--identities", type=int, default=64, help="training identities")
    p.add_argument("--held-out", type=int, default=32, help="identities kept for verification")
    p.add_argument("-P", type=int, default=8, help="identities per batch")
    p.add_argument("-K", type=int, default=4, help="images per identity in a batch")
    p.add_argument("--embedding-size", type=int, default=64)
    p.add_argument("--scale", type=float, default=16.0, help="margin softmax scale s (64 in the recipe)")
    p.add_argument("--lambda-ot", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.loss = args.loss.strip().lower()
    if args.loss not in available_losses():
        _usage_error(f"--loss {args.loss!r} is not a registered loss; registered losses: {', '.join(available_losses())}")
    for option, value, least in (("--steps", args.steps, 1), ("--log-every", args.log_every, 1),
                                 ("--identities", args.identities, 2), ("--held-out", args.held_out, 2),
                                 ("--pairs", args.pairs, 2), ("--embedding-size", args.embedding_size, 1)):
        if value < least:
            _usage_error(f"{option} must be at least {least}, got {value}")
    for option, value in (("--lr", args.lr), ("--scale", args.scale)):
        if not (math.isfinite(value) and value > 0):
            _usage_error(f"{option} must be a positive number, got {value}")
    if not (math.isfinite(args.lambda_ot) and args.lambda_ot >= 0):
        _usage_error(f"--lambda-ot must be a number >= 0, got {args.lambda_ot}")
    if args.P < 2 or args.K < 2:
        _usage_error("-P and -K must be at least 2: OTFace needs positives and negatives in every batch")
    if args.P > args.identities:
        _usage_error(f"-P {args.P} exceeds --identities {args.identities}")
    return args


def main(argv=None) -> int:
    """Exit status: 0 done, 1 the run failed (diverged, non-finite features), 2 bad options, 74
    done but the output to stdout was lost (see ``otface_plugin.cli_output``)."""
    return run_cli("otface-demo", lambda: _main(argv))


def _main(argv) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args = parse_args(argv)
    try:
        run(args)
    except (DemoError, NonFiniteError) as exc:
        print(f"otface-demo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

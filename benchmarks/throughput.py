"""Training throughput: cilearn's full training loop (``cilearn.train.fit``: seeded permutation,
uint8 -> batched crop/flip augmentation -> normalisation on the device, loss, SGD step, lr
schedule, per-epoch NaN check) against the pure model step (forward + backward + SGD on one
fixed, pre-normalised random tensor), same model (resnet32), batch, precision and memory format.

    python benchmarks/throughput.py [--images 5120] [--batch-size 128] [--precision fp32|bf16]
                                    [--size 32] [--device cpu|cuda] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cilearn.data.augment import Augmenter
from cilearn.models import build_net
from cilearn.train import FitSettings, fit


def make_net(device, channels_last):
    torch.manual_seed(0)
    net = build_net("resnet32", "linear", 3)
    net.add_classes(10)
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def pure_step(args, device, dtype) -> float:
    net = make_net(device, True)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    steps = args.images // args.batch_size

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * args.batch_size / (time.perf_counter() - t)


def full_loop(args, device, dtype) -> float:
    net = make_net(device, True)
    n = (args.images // args.batch_size) * args.batch_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    aug = Augmenter("crop-flip", 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def loss_fn(b):
        loss = F.cross_entropy(net(b.x).logits.float(), b.y)
        return loss, {}
    warm = FitSettings(epochs=1, lr=0.01, batch_size=args.batch_size, autocast_dtype=dtype, progress=False)
    fit(net, x[: 3 * args.batch_size], y[: 3 * args.batch_size], loss_fn, warm, aug, g)
    s = FitSettings(epochs=1, lr=0.01, batch_size=args.batch_size, autocast_dtype=dtype, progress=False)
    sync(device)
    r = fit(net, x, y, loss_fn, s, aug, g)
    return r.images_per_s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5120)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    pure, full = [], []
    for _ in range(args.repeats):   # interleaved, so drifts in machine speed hit both alike
        pure.append(pure_step(args, device, dtype))
        full.append(full_loop(args, device, dtype))
    pm, fm = sorted(pure)[len(pure) // 2], sorted(full)[len(full) // 2]
    print(f"resnet32 {args.size}x{args.size} batch {args.batch_size} {args.precision} on {device} "
          f"({torch.get_num_threads()} threads), {args.images} images, median of {args.repeats}")
    print(f"pure model step: {pm:8.1f} img/s   (runs: {', '.join(f'{v:.0f}' for v in pure)})")
    print(f"full loop:       {fm:8.1f} img/s   (runs: {', '.join(f'{v:.0f}' for v in full)})")
    print(f"ratio full/pure: {fm / pm:.3f}")


if __name__ == "__main__":
    main()

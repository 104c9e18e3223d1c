"""PyTorch's own training step on blpa's networks, beside blpa-bench step's rows.

What users of these networks compare blpa with: the same network (scripts/blpa_torch.py's
torch.nn twin of lib/resnet.cpp), SGD with momentum 0.9, cross-entropy on a fixed random
batch, timed in PyTorch eager as people run it:
    tf32-nchw  float32 tensors, TF32 convolutions and matmuls, NCHW
    bf16-nhwc  torch.autocast(bfloat16) with channels_last model and input
    fp32-nchw  float32, TF32 off (the CPU's only float32)
Not part of the trainer. It needs Python and torch; the wheel scripts/setup.sh unpacks will do:
    PYTHONPATH=$HOME/.cache/blpa/torch-<version> python3 scripts/pytorch-step.py \\
        --model resnet164 --batch 128 --device cuda [--numerics tf32-nchw,bf16-nhwc]
One JSON line per setting, with the median over --rounds x --steps timed steps; the settings
take turns each round, as blpa-bench step --rounds does.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blpa_torch  # noqa: E402

MODELS = {"resnet164": ("cifar", 164, 32, 10), "resnet152": ("imagenet", 152, 224, 1000)}


def parse_model(name):
    if name in MODELS:
        return MODELS[name]
    arch, depth = name.split(":")
    return (arch, int(depth), 32 if arch == "cifar" else 224, 10 if arch == "cifar" else 1000)


class Rig:
    def __init__(self, model, batch, device, numerics):
        arch, depth, size, classes = parse_model(model)
        self.precision, layout = numerics.split("-")
        self.layout = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        torch.manual_seed(0)
        self.net = blpa_torch.ResNet(arch, depth, 3, classes).to(device).to(memory_format=self.layout).train()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=self.layout)
        self.y = torch.randint(0, classes, (batch,), device=device)
        self.device = device

    def step(self):
        tf32 = self.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = F.cross_entropy(self.net(self.x).float(), self.y)
        loss.backward()
        self.opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet164")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--numerics", default=None, help="comma list of tf32-nchw, bf16-nhwc, fp32-nchw, bf16-nchw, ...")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    device = torch.device(a.device)
    numerics = a.numerics or ("tf32-nchw,bf16-nhwc" if device.type == "cuda" else "fp32-nchw,bf16-nhwc")
    rigs = {}
    for n in numerics.split(","):
        rigs[n] = Rig(a.model, a.batch, device, n)
        for _ in range(a.warmup):
            rigs[n].step()
    times = {n: [] for n in rigs}
    for _ in range(a.rounds):
        for n, rig in rigs.items():
            for _ in range(a.steps):
                sync(device)
                t0 = time.perf_counter()
                rig.step()
                sync(device)
                times[n].append((time.perf_counter() - t0) * 1e3)
    for n, ms in times.items():
        med = statistics.median(ms)
        precision, layout = n.split("-")
        # The fields of blpa-bench step's rows where they mean the same (mode "pytorch", steps
        # per round), so that one table reads both.
        print(json.dumps({"bench": "pytorch-step", "torch": torch.__version__, "model": a.model, "batch": a.batch,
                          "device": str(device), "mode": "pytorch", "numerics": n, "precision": precision,
                          "memory_format": layout, "median_ms": round(med, 3),
                          "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3),
                          "images_per_s": round(a.batch * 1e3 / med, 2), "steps": a.steps, "rounds": a.rounds}))


if __name__ == "__main__":
    main()

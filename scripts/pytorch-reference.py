"""What an ordinary PyTorch pre-activation ResNet-164 keeps for backward, per sample.

A cross-check of blpa-bench memory's `plain` row against PyTorch itself, not part of the
trainer. It needs Python and torch: the wheel scripts/setup.sh unpacks will do,
    PYTHONPATH=$HOME/.cache/blpa/torch-<version> python3 scripts/pytorch-reference.py [BATCH]
Saved tensors are seen through torch.autograd.graph.saved_tensors_hooks and counted twice:
by storage (what memory holds: a tensor saved by two operations counts once) and by saved
tensor (ReLU's output is saved by the ReLU and by the convolution after it).
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        out = 4 * width
        self.bn1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, width, 1, bias=False)
        self.bn2, self.c2 = nn.BatchNorm2d(width), nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn3, self.c3 = nn.BatchNorm2d(width), nn.Conv2d(width, out, 1, bias=False)
        self.proj = nn.Conv2d(cin, out, 1, stride, bias=False) if stride != 1 or cin != out else None

    def forward(self, x):
        r = F.relu(self.bn1(x))
        shortcut = self.proj(r) if self.proj is not None else x
        h = self.c2(F.relu(self.bn2(self.c1(r))))
        return self.c3(F.relu(self.bn3(h))) + shortcut


class ResNet(nn.Module):  # lib/resnet.cpp's cifar network
    def __init__(self, depth=164, classes=10):
        super().__init__()
        n = (depth - 2) // 9
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        blocks, c = [], 16
        for i, width in enumerate([16, 32, 64]):
            for b in range(n):
                blocks.append(Block(c, width, 2 if i > 0 and b == 0 else 1))
                c = 4 * width
        self.blocks, self.bn, self.fc = nn.Sequential(*blocks), nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.blocks(self.stem(x)))).mean((2, 3)))


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.manual_seed(0)
    net, x = ResNet(), torch.randn(batch, 3, 32, 32)
    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in net.parameters()}
    by_storage, per_tensor = {}, 0

    def pack(t):
        nonlocal per_tensor
        st = t.untyped_storage()
        if st.data_ptr() not in skip:  # the batch and the weights exist anyway
            by_storage[st.data_ptr()] = st.nbytes()
            per_tensor += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    mib = lambda n: n / batch / 2**20
    print(f"torch {torch.__version__}, ResNet-164, batch {batch}: per sample "
          f"{mib(sum(by_storage.values())):.2f} MiB by storage, {mib(per_tensor):.2f} MiB by saved tensor")


if __name__ == "__main__":
    main()

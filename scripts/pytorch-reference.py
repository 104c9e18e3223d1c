"""What an ordinary PyTorch pre-activation ResNet-164 keeps for backward, per sample.

A cross-check of blpa-bench memory's `plain` row against PyTorch itself, not part of the
trainer. It needs Python and torch: the wheel scripts/setup.sh unpacks will do,
    PYTHONPATH=$HOME/.cache/blpa/torch-<version> python3 scripts/pytorch-reference.py [BATCH]
The network is scripts/blpa_torch.py's, in training mode: plain PyTorch modules and autograd.
Saved tensors are seen through torch.autograd.graph.saved_tensors_hooks and counted twice:
by storage (what memory holds: a tensor saved by two operations counts once) and by saved
tensor (ReLU's output is saved by the ReLU and by the convolution after it).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blpa_torch  # noqa: E402  (lib/resnet.cpp's networks in torch.nn, beside this file)


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.manual_seed(0)
    net, x = blpa_torch.ResNet("cifar", 164), torch.randn(batch, 3, 32, 32)
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

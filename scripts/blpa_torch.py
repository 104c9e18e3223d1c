"""The networks blpa trains, as torch.nn modules whose state dicts are blpa-train --export's.

blpa-train --export model.pt writes the weights and BatchNorm statistics under blpa's own
names (stem.weight, blocks.I.u1.gamma, blocks.I.u1.shortcut_weight, final.running_var,
fc.weight, ...). The modules here have exactly those names, so loading is strict:

    import torch, blpa_torch                      # scripts/ on sys.path; torch only
    net = blpa_torch.ResNet("cifar", 164, in_channels=3, num_classes=10)
    net.load_state_dict(torch.load("model.pt"))   # strict: every key, every shape
    net = blpa_torch.load("model.pt")             # or: the network read off the file's shapes
    net.eval()
    logits = net(images)                          # N x C x H x W, normalised as blpa-train did

The input is normalised per channel as the trainer did: (pixel / 255 - mean) / std with the
training images' mean and std (CIFAR, MNIST-style: the run's log and summary record them as
"normalisation") or ImageNet's usual constants (IMAGENET_MEAN, IMAGENET_STD), where
eval_views(rgb) makes blpa-eval's crops of a decoded image, decoded at decode_scale(w, h).
The export holds contiguous float32 tensors; a bf16 run's blpa-eval evaluates in bf16 (its
--precision fp32 evaluates as this module does).

In evaluation mode the logits equal blpa's to float rounding (a CTest test checks 1e-5 on a
CIFAR-style and an ImageNet-style network). In training mode this is blpa's `plain` mode:
BatchNorm with batch statistics and ordinary autograd. blpa's other modes keep gamma >= 1e-8
after every update and clamp it there in the forward pass; the weights they export already
satisfy it, so no clamp is needed here.

    python3 scripts/blpa_torch.py model.pt     # which network a file holds; loads it strictly
"""
import os
import re
import sys
import zipfile

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # run as a program: one line, not a traceback
    if __name__ == "__main__":
        sys.exit(f"blpa_torch.py: needs PyTorch ({e})")
    raise

__all__ = ["Unit", "Block", "ResNet", "IMAGENET_STAGES", "from_state_dict", "load", "IMAGENET_MEAN", "IMAGENET_STD",
           "decode_scale", "eval_views"]

# Blocks per stage of the ImageNet networks (lib/resnet.cpp, imagenet_stages).
IMAGENET_STAGES = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3], 200: [3, 24, 36, 3]}


class Unit(nn.Module):
    """BatchNorm -> ReLU -> zero, one or two convolutions of the same r (lib/unit.h).

    Parameters gamma, beta, weight (the first convolution), shortcut_weight (a block's
    projection, which reads the same r); buffers running_mean, running_var. Momentum 0.1,
    eps 1e-5, unbiased variance for the running estimate, as torch.nn.BatchNorm2d.
    """

    def __init__(self, in_channels, convs=()):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(in_channels))
        self.beta = nn.Parameter(torch.zeros(in_channels))
        self.register_buffer("running_mean", torch.zeros(in_channels))
        self.register_buffer("running_var", torch.ones(in_channels))
        self.momentum, self.eps = 0.1, 1e-5
        self.geometry = []  # (stride, padding) of each convolution
        for i, (out_channels, kernel, stride, padding) in enumerate(convs):
            w = torch.empty(out_channels, in_channels, kernel, kernel)
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
            self.register_parameter("weight" if i == 0 else "shortcut_weight", nn.Parameter(w))
            self.geometry.append((stride, padding))

    def forward(self, x):
        a = F.batch_norm(x, self.running_mean, self.running_var, self.gamma, self.beta, self.training,
                         self.momentum, self.eps)
        r = F.relu(a)
        if not self.geometry:
            return [r]
        weights = [self.weight] + ([self.shortcut_weight] if len(self.geometry) > 1 else [])
        return [F.conv2d(r, w, None, s, p) for w, (s, p) in zip(weights, self.geometry)]


class Block(nn.Module):
    """Pre-activation bottleneck: units 1x1, 3x3/stride, 1x1 (x4 channels). When the shape
    changes, the projection shortcut is u1's second convolution, reading u1's r."""

    def __init__(self, in_channels, width, stride):
        super().__init__()
        out = 4 * width
        self.projection = stride != 1 or in_channels != out
        first = [(width, 1, 1, 0)] + ([(out, 1, stride, 0)] if self.projection else [])
        self.u1 = Unit(in_channels, first)
        self.u2 = Unit(width, [(width, 3, stride, 1)])
        self.u3 = Unit(width, [(out, 1, 1, 0)])

    def forward(self, x):
        y1 = self.u1(x)
        shortcut = y1[1] if self.projection else x
        return self.u3(self.u2(y1[0])[0])[0] + shortcut


class ResNet(nn.Module):
    """arch "cifar": depth 9n+2, stages of n blocks, widths 16/32/64 (x4), 3x3 stem.
    arch "imagenet": depth 50/101/152/200, widths 64/128/256/512 (x4), 7x7/2 stem and 3x3/2
    max-pool. Both end with BatchNorm-ReLU, the spatial mean and a linear classifier."""

    def __init__(self, arch="cifar", depth=164, in_channels=3, num_classes=10):
        super().__init__()
        if arch == "cifar":
            if depth < 11 or (depth - 2) % 9:
                raise ValueError(f"cifar depth must be 9n+2 with n >= 1 (e.g. 56, 110, 164, 1001), got {depth}")
            stages, widths, channels = [(depth - 2) // 9] * 3, [16, 32, 64], 16
            self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        elif arch == "imagenet":
            if depth not in IMAGENET_STAGES:
                raise ValueError(f"imagenet depth must be 50, 101, 152 or 200, got {depth}")
            stages, widths, channels = IMAGENET_STAGES[depth], [64, 128, 256, 512], 64
            self.stem = nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False)
        else:
            raise ValueError(f"arch must be cifar or imagenet, got {arch!r}")
        nn.init.kaiming_normal_(self.stem.weight, mode="fan_out", nonlinearity="relu")
        self.arch, self.depth = arch, depth
        blocks = []
        for s, (n, width) in enumerate(zip(stages, widths)):
            for b in range(n):
                blocks.append(Block(channels, width, 2 if s > 0 and b == 0 else 1))
                channels = 4 * width
        self.blocks = nn.ModuleList(blocks)
        self.final = Unit(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        h = self.stem(x)
        if self.arch == "imagenet":
            h = F.max_pool2d(h, 3, 2, 1)
        for block in self.blocks:
            h = block(h)
        # the mean, as blpa computes it (adaptive average pooling gives the same up to rounding)
        return self.fc(self.final(h)[0].mean((2, 3)))


def from_state_dict(state_dict):
    """The network a blpa state dict holds (arch, depth, input channels and classes read off
    its keys and shapes), with the state dict loaded strictly (a ValueError says what does not fit)."""
    if (not isinstance(state_dict, dict) or "stem.weight" not in state_dict
            or not all(isinstance(t, torch.Tensor) for t in state_dict.values())):
        raise ValueError("not a blpa state dict (a dict of tensors with 'stem.weight', as blpa-train --export writes)")
    stem = state_dict["stem.weight"]
    blocks = {int(m.group(1)) for k in state_dict for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    n = len(blocks)
    if stem.shape[-1] == 7:
        depths = {sum(v): d for d, v in IMAGENET_STAGES.items()}
        if n not in depths:
            raise ValueError(f"an imagenet network with {n} blocks is none of depth 50, 101, 152 or 200")
        arch, depth = "imagenet", depths[n]
    else:
        if n == 0 or n % 3:
            raise ValueError(f"a cifar network has 3n blocks, this state dict has {n}")
        arch, depth = "cifar", 9 * (n // 3) + 2
    if "fc.weight" not in state_dict:
        raise ValueError("not a blpa state dict: it has no 'fc.weight'")
    net = ResNet(arch, depth, stem.shape[1], state_dict["fc.weight"].shape[0])
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as e:  # missing, unexpected or misshapen keys: torch's own list of them
        raise ValueError(f"not the state dict of a blpa {arch}-{depth}: {e}") from e
    return net


def _zip_check(f):
    """For f (a path or a binary file object, left where it was): "checkpoint" where it is
    LibTorch's archive of a module, as blpa-train's checkpoints are, rather than a torch.save
    file; else the name of its first record whose bytes fail their CRC, as a copy damaged on
    the way has (torch.load reads them without checking); else None."""
    start = f.tell() if hasattr(f, "seek") else None
    try:
        if not zipfile.is_zipfile(f):
            return None  # torch.load says what it is not
        with zipfile.ZipFile(f) as z:
            if any(n.endswith("/constants.pkl") for n in z.namelist()):
                return "checkpoint"
            for info in z.infolist():  # testzip(), but a CRC of 0 is none (torch.save can leave them out)
                if info.CRC == 0:
                    continue
                try:
                    with z.open(info) as record:  # checks the CRC at its end
                        while record.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
            return None
    finally:
        if start is not None:
            f.seek(start)


def _name(f):
    return os.fsdecode(f) if isinstance(f, (str, bytes, os.PathLike)) else getattr(f, "name", repr(f))


def load(f, map_location="cpu"):
    """from_state_dict(torch.load(f)): a blpa-train --export file (a path or a binary file
    object) as a network."""
    name = _name(f)
    check = _zip_check(f)
    # A checkpoint (LibTorch's archive of the model, optimiser and run) is no state dict.
    if check == "checkpoint":
        raise ValueError(f"{name} is a blpa-train checkpoint, not an --export file: blpa-eval --checkpoint {name} "
                         "--export MODEL.pt writes one from it (blpa-train --export MODEL.pt at a run's end)")
    if check is not None:  # it loaded, with wrong weights (2.4e6 for a loss of 1.1), and said nothing
        raise ValueError(f"{name} is damaged: its record {check} fails its CRC check (the file changed after it "
                         "was written, as a bad copy or disk changes one): export it again")
    try:
        state_dict = torch.load(f, map_location=map_location)
    except OSError:
        raise
    except Exception as e:  # a file cut short, not a torch.save file, ...: torch's first words
        said = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise ValueError(f"{name} cannot be read as a torch.save file ({type(e).__name__}"
                         f"{': ' + said if said and said != type(e).__name__ else ''})") from e
    return from_state_dict(state_dict)


# ImageNet's usual per-channel mean and std of pixel / 255, which blpa's ImageNet runs use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# libjpeg-turbo's scaled decoding, in TurboJPEG's order (tjGetScalingFactors), the
# reductions only.
_JPEG_SCALES = ((1, 1), (7, 8), (3, 4), (5, 8), (1, 2), (3, 8), (1, 4), (1, 8))


def decode_scale(width, height, min_short=256):
    """The scale (num, denom) at which blpa decodes a width x height JPEG for evaluation
    (min_short: blpa-eval's --resize), and the decoded size (ceil(side * num / denom)): the
    smallest of libjpeg-turbo's n/8 reductions whose shorter side stays >= min_short.
    PyTurboJPEG's decode(..., scaling_factor=(num, denom)) decodes the same way (ISLOW DCT
    both); a full-size decode, as torchvision.io.decode_jpeg's, gives slightly other pixels,
    and PIL's draft() has only halvings."""
    best = (1, 1, width, height)
    for num, denom in _JPEG_SCALES:
        w, h = -(-width * num // denom), -(-height * num // denom)
        if min(w, h) >= min_short and w * h < best[2] * best[3]:
            best = (num, denom, w, h)
    return best


def _lround(x):  # C's lround for x >= 0: halves round up
    i = int(x)
    return i + 1 if x - i >= 0.5 else i


def _source_box(w, h, f, cx, cy, crop):
    """The box (x, y, width, height) of the image that becomes a crop x crop window at (cx, cy)
    of the image resized by f (data/imagenet.cpp, source_box)."""
    bw = min(max(_lround(crop / f), 1), w)
    bh = min(max(_lround(crop / f), 1), h)
    return (min(max(_lround(cx / f), 0), w - bw), min(max(_lround(cy / f), 0), h - bh), bw, bh)


def eval_views(rgb, resize_short=256, crop=224, ten_crop=False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """blpa-eval's and blpa-predict's evaluation input of one decoded image, bit for bit given
    the same pixels: rgb is an H x W x 3 uint8 tensor (decoded as decode_scale says); returns
    1 (ten_crop: 10) x 3 x crop x crop float32, normalised. The centre crop of the image with
    its shorter side at resize_short is cut from the decoded image (whole pixels) and resized
    once (bilinear, antialiased when shrinking), where torchvision's Resize then CenterCrop
    resizes the whole image first; ten_crop: the four corners and the centre, then their
    mirrors."""
    if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[2] != 3:
        raise ValueError(f"eval_views takes an H x W x 3 uint8 image, not {rgb.dtype} {tuple(rgb.shape)}")
    h, w = rgb.shape[0], rgb.shape[1]
    f = resize_short / min(w, h)
    right, bottom = w * f - crop, h * f - crop
    boxes = [_source_box(w, h, f, right / 2, bottom / 2, crop)]
    if ten_crop:
        boxes = [_source_box(w, h, f, cx, cy, crop) for cx, cy in ((0, 0), (right, 0), (0, bottom), (right, bottom))]
        boxes.append(_source_box(w, h, f, right / 2, bottom / 2, crop))
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1)
    views = []
    for x, y, bw, bh in boxes:
        v = rgb[y:y + bh, x:x + bw].permute(2, 0, 1).unsqueeze(0).float()
        if (bw, bh) != (crop, crop):
            v = F.interpolate(v, size=(crop, crop), mode="bilinear", align_corners=False, antialias=True)
        views.append(((v[0].reshape(3, -1) / 255.0 - m) / s).view(3, crop, crop))
    if ten_crop:
        views += [v.flip(2) for v in views]
    return torch.stack(views)


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        print(__doc__.strip().splitlines()[0] + "\nusage: python3 blpa_torch.py MODEL.pt", file=sys.stderr)
        return 2
    try:
        net = load(argv[1])
    except (OSError, ValueError) as e:
        print(f"blpa_torch.py: {e}", file=sys.stderr)
        return 1
    params = sum(p.numel() for p in net.parameters())
    print(f"{argv[1]}: {net.arch}-{net.depth}, {net.stem.in_channels} input channels, "
          f"{net.fc.out_features} classes, {params / 1e6:.2f}M parameters; loads strictly")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

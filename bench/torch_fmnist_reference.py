#!/usr/bin/env python3
"""PyTorch's time-to-accuracy reference for examples/resnet (mpu_resnet): the same ResNet, data,
augmentation, optimizer and learning-rate schedule on Fashion-MNIST, written as a good PyTorch
user would write it for speed, printing the test accuracy and the training seconds after every
epoch.

usage: bench/torch_fmnist_reference.py [--epochs 30] [--batch-size 128] [--lr 0.1]
           [--optimizer sgd|adam|adamw] [--momentum 0.9] [--weight-decay 5e-4]
           [--schedule cosine|step|constant] [--warmup-epochs 1] [--label-smoothing 0]
           [--crop-padding 2] [--seed 0]
           [--precision fp32|bf16_autocast|fp16_autocast] [--channels-last] [--cudnn-benchmark] [--compile]
           [--target-acc 0.94] [--json FILE] [--data DIR]
       torchrun --standalone --nproc-per-node N bench/torch_fmnist_reference.py ...   (DDP)
       bench/torch_fmnist_reference.py --device cpu --epochs 1 --limit-train 512 --limit-test 256
           (a CPU smoke run)

What it matches in examples/resnet/main.cpp and models.cpp (defaults as there; unset flags take
the example's GPU defaults on --device cuda and its CPU defaults on --device cpu):
- Model: torchvision's ResNet-18 (34, 50) layer for layer, with the small-input stem of the
  example: one 3x3 stride-1 convolution from 1 channel to 64, BN, ReLU, no max pooling; four
  stages of 64, 128, 256, 512 planes (strides 1, 2, 2, 2; a 1x1 strided convolution and BN on
  the shortcut where the shape changes); global average pooling; a linear layer to 10 classes.
  ResNet-20 is He et al.'s CIFAR network with parameter-free (option A) shortcuts. Kaiming-normal
  convolutions (fan-out, ReLU), BN weight 1 and bias 0, PyTorch's default linear layer.
- Data: the 60,000 training and 10,000 test images of Fashion-MNIST from --data ($FASHION_MNIST_DIR,
  else /usr/share/datasets/fashion-mnist), idx files plain or gzipped. Training images: zero
  padding of --crop-padding pixels and a random 28x28 crop, a horizontal flip with probability
  1/2, then (x/255 - 0.2860) / 0.3530; test images normalised only.
- Optimizer: SGD (momentum, coupled weight decay), Adam or AdamW; --lr is for the total batch of
  all ranks, with the gradients averaged (DDP): the update torch-mpu makes with summed
  gradients and its optimizer rescaled for n processes. Default lr 0.1 for sgd, 1e-3 otherwise;
  weight decay 5e-4 for sgd, 0 for adam, 0.05 for adamw.
- Schedule, set before every step at the step's middle in epochs: linear warm-up from 0 over
  --warmup-epochs, then cosine decay to 0 at the last epoch, step decay (x0.1 at 50 % and 75 %)
  or constant.
- Evaluation after every epoch on the full test set, in eval mode (BN running statistics).

How it runs (no host synchronisation inside an epoch):
- The whole data set is uploaded to each GPU once, as uint8, the training images already padded.
- Every epoch a torch.randperm on the device (the same seed on every rank, as DistributedSampler:
  with WORLD_SIZE > 1 rank r takes every WORLD_SIZE-th index from r, the size mod WORLD_SIZE
  left over dropped) orders the shard, and one gather forms the epoch's augmented images: the
  crop is an index of the padded images at per-image random offsets, the flip reverses the
  column index under torch.where on a random mask, and the result is normalised into one float
  tensor of the epoch, which the steps slice into batches (the last partial batch dropped).
- bf16_autocast / fp16_autocast: fp32 parameters, forward and loss under torch.autocast; fp16
  with torch.amp.GradScaler at its defaults. --optimizer-impl auto takes PyTorch's fused
  optimizer on GPUs (its step also takes GradScaler's scale and overflow flag on the device, so
  that fp16 steps need no host synchronisation either), PyTorch's default elsewhere. The loss is summed on the device and read once per epoch.
- cuDNN autotuning (torch.backends.cudnn.benchmark) is off unless --cudnn-benchmark, as in
  mpu_resnet: on one H100 it cost seconds of start-up for a few per cent faster steps.
- --channels-last converts the model and the images; --compile wraps the (DDP) model in
  torch.compile (compilation falls in the first epoch's time).
- DDP (torchrun, WORLD_SIZE > 1): NCCL on GPUs, Gloo on CPUs; default buckets,
  gradient_as_bucket_view. Rank 0 evaluates and prints.

Timing: the clock starts, after a device synchronisation (and a barrier), just before the data
set is uploaded to the device; the model is built before. Each epoch ends with a device
synchronisation (and a barrier); the evaluation that follows, the reading of the loss and the
JSON are left out of the training seconds, and their time is reported on its own. "seconds" is
the training time elapsed at the end of that epoch.

--json FILE writes, after every epoch, {"system": "pytorch", "gpus", "device", "torch", "args",
"parameters", "epochs": [{"epoch", "seconds", "test_acc", "train_loss", "eval_seconds"}],
"time_to": {"0.90": s, "0.94": s, "0.95": s or null}} (seconds at the first epoch whose test
accuracy reached the key; --target-acc adds its own key, and stops the run at the end of the
first epoch that reaches it).
"""
import argparse
import contextlib
import datetime
import gzip
import json
import math
import os
import struct
import sys
import time

KMEAN = 0.2860  # of Fashion-MNIST's training pixels scaled to [0, 1], as include/mpu/datasets.h
KSTD = 0.3530
IMAGE_SIZE = 28
CLASSES = 10
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DATA_DIR = "FASHION_MNIST_DIR"
TIME_TO = ("0.90", "0.94", "0.95")
PRECISIONS = ("fp32", "bf16_autocast", "fp16_autocast")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet20")
# examples/resnet/main.cpp's kGpuDefaults and kCpuDefaults.
GPU_DEFAULTS = {"arch": "resnet18", "epochs": 30, "batch_size": 128, "warmup_epochs": 1.0}
CPU_DEFAULTS = {"arch": "resnet20", "epochs": 3, "batch_size": 64, "warmup_epochs": 0.25}
# The seed streams of the data order (same on every rank) and of the augmentation (per rank).
ORDER_STREAM = 0x6F72646572  # "order"
AUGMENT_STREAM = 0x6175676D  # "augm"


# ------------------------------------------------------------------------------------------------
# Command line (no torch: --help and bad arguments answer at once)

def idx_path(directory, name):
    """The idx file `name` in `directory`, plain or gzipped; None when neither exists."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, help="model (default: resnet18 on cuda, resnet20 on cpu)")
    p.add_argument("--epochs", type=int, help="epochs (default: 30 on cuda, 3 on cpu)")
    p.add_argument("--batch-size", type=int, help="batch per process (default: 128 on cuda, 64 on cpu)")
    p.add_argument("--lr", type=float, help="learning rate for the total batch (default: 0.1 for sgd, 1e-3 otherwise)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float,
                   help="weight decay (default: 5e-4 for sgd, 0 for adam, 0.05 for adamw)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"],
                   help="after the warm-up: cosine to 0, step (x0.1 at 50 %% and 75 %%), constant")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0 (default: 1 on cuda, 0.25 on cpu)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the cross-entropy loss (default: 0)")
    p.add_argument("--crop-padding", type=int, default=2, help="zero padding of the random 28x28 crop (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; *_autocast: fp32 parameters, forward and loss under torch.autocast "
                        "(fp16 with GradScaler, cuda only) (default: fp32)")
    p.add_argument("--channels-last", action="store_true", help="model and images in channels_last")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (off by default, as in mpu_resnet)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--optimizer-impl", default="auto", choices=["auto", "fused", "foreach", "for-loop", "default"],
                   help="auto: fused on cuda, PyTorch's default (foreach) on cpu")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--threads", type=int, default=0, help="intra-op threads on cpu (default: PyTorch's)")
    p.add_argument("--data", help=f"Fashion-MNIST directory (default: ${ENV_DATA_DIR}, else {DEFAULT_DATA_DIR})")
    p.add_argument("--limit-train", type=int, default=0, help="train on the first N training images (0: all)")
    p.add_argument("--limit-test", type=int, default=0, help="evaluate on the first M test images (0: all)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--target-acc", type=float, help="stop after the first epoch whose test accuracy reaches this")
    p.add_argument("--json", help="write the results here (rewritten after every epoch)")
    a = p.parse_args(argv)

    defaults = GPU_DEFAULTS if a.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.lr is None:
        a.lr = 0.1 if a.optimizer == "sgd" else 1e-3
    if a.weight_decay is None:
        a.weight_decay = {"sgd": 5e-4, "adam": 0.0, "adamw": 5e-2}[a.optimizer]
    if a.data is None:
        a.data = os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR

    if a.epochs < 1:
        p.error(f"--epochs {a.epochs}: needs at least 1")
    if a.batch_size < 1:
        p.error(f"--batch-size {a.batch_size}: needs at least 1")
    if a.eval_batch_size < 1:
        p.error(f"--eval-batch-size {a.eval_batch_size}: needs at least 1")
    if not a.lr > 0:
        p.error(f"--lr {a.lr}: needs to be positive")
    if not 0 <= a.momentum <= 1:
        p.error(f"--momentum {a.momentum}: needs to be in [0, 1]")
    if not a.weight_decay >= 0:
        p.error(f"--weight-decay {a.weight_decay}: needs to be at least 0")
    if not a.warmup_epochs >= 0:
        p.error(f"--warmup-epochs {a.warmup_epochs}: needs to be at least 0")
    if not 0 <= a.label_smoothing < 1:
        p.error(f"--label-smoothing {a.label_smoothing}: needs to be in [0, 1)")
    if not 0 <= a.crop_padding <= 14:
        p.error(f"--crop-padding {a.crop_padding}: needs to be in [0, 14]")
    if a.limit_train < 0 or a.limit_test < 0:
        p.error("--limit-train and --limit-test need to be at least 0 (0: all)")
    if a.threads < 0:
        p.error(f"--threads {a.threads}: needs to be at least 0")
    if a.target_acc is not None and not 0 < a.target_acc <= 1:
        p.error(f"--target-acc {a.target_acc}: needs to be in (0, 1]")
    if a.device == "cpu" and a.precision == "fp16_autocast":
        p.error("--precision fp16_autocast needs --device cuda (float16 autocast with GradScaler is "
                "measured on GPUs only); use bf16_autocast on cpu")
    if a.device == "cpu" and a.optimizer_impl == "fused":
        p.error("--optimizer-impl fused needs --device cuda; use auto, default or foreach on cpu")
    if not os.path.isdir(a.data):
        p.error(f"--data {a.data}: no such directory (Debian's dataset-fashion-mnist installs "
                f"{DEFAULT_DATA_DIR}; ${ENV_DATA_DIR} or --data point elsewhere)")
    missing = [f for f in TRAIN_FILES + TEST_FILES if idx_path(a.data, f) is None]
    if missing:
        p.error(f"--data {a.data}: {', '.join(missing)} (plain or .gz) missing; the directory needs "
                f"{', '.join(TRAIN_FILES + TEST_FILES)}")
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        p.error(f"WORLD_SIZE={world}: needs to be a positive integer (torchrun sets it)")
    return a


# ------------------------------------------------------------------------------------------------
# Data

def read_idx(path):
    """An idx file (plain or gzipped) of unsigned bytes, as a uint8 tensor of its dimensions."""
    import torch

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (its magic number is {data[:4].hex()})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: element type 0x{data[2]:02x}; this reader takes unsigned bytes (0x08)")
    dims = struct.unpack(f">{data[3]}I", data[4:4 + 4 * data[3]])
    payload = data[4 + 4 * len(dims):]
    if len(payload) != math.prod(dims):
        raise ValueError(f"{path}: {len(payload)} bytes of data for dimensions {dims}")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(*dims)


def load_split(directory, files, limit):
    images = read_idx(idx_path(directory, files[0]))
    labels = read_idx(idx_path(directory, files[1]))
    if images.dim() != 3 or labels.dim() != 1 or images.size(0) != labels.size(0):
        raise ValueError(f"{directory}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                         "do not pair up as [N, 28, 28] and [N]")
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


# ------------------------------------------------------------------------------------------------
# Models: examples/resnet/models.cpp, with torchvision's parameter names

def build_model(arch, in_channels, classes):
    import torch
    from torch import nn

    def conv3x3(i, o, stride=1):
        return nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False)

    def conv1x1(i, o, stride=1):
        return nn.Conv2d(i, o, 1, stride=stride, bias=False)

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, in_planes, planes, stride):
            super().__init__()
            self.conv1 = conv3x3(in_planes, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or in_planes != planes:
                self.downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out = out + (self.downsample(x) if self.downsample is not None else x)
            return torch.relu(out)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, in_planes, planes, stride):
            super().__init__()
            self.conv1 = conv1x1(in_planes, planes)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, planes, stride)  # v1.5: the stride in the 3x3
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = conv1x1(planes, planes * 4)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.downsample = None
            if stride != 1 or in_planes != planes * 4:
                self.downsample = nn.Sequential(conv1x1(in_planes, planes * 4, stride), nn.BatchNorm2d(planes * 4))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = torch.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            out = out + (self.downsample(x) if self.downsample is not None else x)
            return torch.relu(out)

    class ResNet(nn.Module):
        """torchvision's ResNet with the small-input stem: conv 3x3 stride 1, no max pooling."""

        def __init__(self, block, blocks):
            super().__init__()
            self.in_planes = 64
            self.conv1 = conv3x3(in_channels, 64)
            self.bn1 = nn.BatchNorm2d(64)
            self.layer1 = self._stage(block, 64, blocks[0], 1)
            self.layer2 = self._stage(block, 128, blocks[1], 2)
            self.layer3 = self._stage(block, 256, blocks[2], 2)
            self.layer4 = self._stage(block, 512, blocks[3], 2)
            self.fc = nn.Linear(self.in_planes, classes)

        def _stage(self, block, planes, n, stride):
            layers = []
            for b in range(n):
                layers.append(block(self.in_planes, planes, stride if b == 0 else 1))
                self.in_planes = planes * block.expansion
            return nn.Sequential(*layers)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class PadShortcut(nn.Module):
        """Option A of He et al.: every second pixel, the new channels zero."""

        def __init__(self, in_planes, planes, stride):
            super().__init__()
            self.extra = planes - in_planes
            self.stride = stride

        def forward(self, x):
            if self.stride > 1:
                x = x[:, :, ::self.stride, ::self.stride]
            if self.extra > 0:
                x = nn.functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return x

    class CifarBlock(nn.Module):
        def __init__(self, in_planes, planes, stride):
            super().__init__()
            self.conv1 = conv3x3(in_planes, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = PadShortcut(in_planes, planes, stride)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + self.shortcut(x))

    class CifarResNet(nn.Module):
        def __init__(self, depth):
            super().__init__()
            n = (depth - 2) // 6
            self.conv1 = conv3x3(in_channels, 16)
            self.bn1 = nn.BatchNorm2d(16)
            in_planes = 16
            for i, planes in enumerate((16, 32, 64)):
                stage = []
                for b in range(n):
                    stage.append(CifarBlock(in_planes, planes, 2 if i > 0 and b == 0 else 1))
                    in_planes = planes
                setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            self.fc = nn.Linear(in_planes, classes)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    model = {
        "resnet18": lambda: ResNet(BasicBlock, (2, 2, 2, 2)),
        "resnet34": lambda: ResNet(BasicBlock, (3, 4, 6, 3)),
        "resnet50": lambda: ResNet(Bottleneck, (3, 4, 6, 3)),
        "resnet20": lambda: CifarResNet(20),
    }[arch]()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# ------------------------------------------------------------------------------------------------
# Training

def lr_factor(a, epoch):
    """examples/resnet/main.cpp's lr_factor at a fractional epoch."""
    if a.warmup_epochs > 0 and epoch < a.warmup_epochs:
        return epoch / a.warmup_epochs
    if a.schedule == "constant":
        return 1.0
    if a.schedule == "step":
        return 1.0 if epoch < 0.5 * a.epochs else 0.1 if epoch < 0.75 * a.epochs else 0.01
    warmup = max(a.warmup_epochs, 0.0)
    span = a.epochs - warmup
    t = min(1.0, (epoch - warmup) / span) if span > 0 else 1.0
    return 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(a, params, cuda):
    import torch

    impl = a.optimizer_impl if a.optimizer_impl != "auto" else ("fused" if cuda else "default")
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
              "default": {}}[impl]
    if a.optimizer == "sgd":
        return torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay, **kwargs), impl
    cls = torch.optim.Adam if a.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=a.lr, weight_decay=a.weight_decay, **kwargs), impl


def write_atomically(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    a = parse_args(argv)

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = a.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            sys.exit("torch_fmnist_reference.py: --device cuda, but PyTorch sees no GPU (--device cpu runs on CPUs)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if a.threads:
            torch.set_num_threads(a.threads)
    distributed = world > 1
    if distributed:
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    lead = rank == 0

    def say(text):
        if lead:
            print(f"torch_fmnist_reference: {text}", flush=True)

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)
        if distributed:
            dist.barrier()

    try:
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
        train_images, train_labels = load_split(a.data, TRAIN_FILES, a.limit_train)
        test_images, test_labels = load_split(a.data, TEST_FILES, a.limit_test)
        n_train = train_images.size(0)
        shard = n_train // world
        steps = shard // a.batch_size
        if steps < 1:
            sys.exit(f"torch_fmnist_reference.py: {n_train} training images make {shard} per rank over "
                     f"{world} rank(s), fewer than one batch of {a.batch_size}; lower --batch-size or "
                     "raise --limit-train")

        torch.manual_seed(a.seed)
        model = build_model(a.arch, 1, CLASSES)
        parameters = sum(p.numel() for p in model.parameters())
        memory_format = torch.channels_last if a.channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=memory_format)
        eval_model = model
        if distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[local_rank] if cuda else None, gradient_as_bucket_view=True)
        if a.compile:
            model = torch.compile(model, mode=a.compile_mode)
        optimizer, impl = make_optimizer(a, eval_model.parameters(), cuda)
        autocast_dtype = {"bf16_autocast": torch.bfloat16, "fp16_autocast": torch.float16}.get(a.precision)
        scaler = torch.amp.GradScaler("cuda") if a.precision == "fp16_autocast" else None

        def autocast():
            if autocast_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device.type, dtype=autocast_dtype)

        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        say(f"{a.arch} ({parameters:,} parameters), {a.precision}, on {world} x {name} "
            f"({'DDP, ' + ('NCCL' if cuda else 'Gloo') if distributed else 'one process'}); batch "
            f"{a.batch_size} per process ({a.batch_size * world} in all), {steps} steps per epoch; "
            f"{a.optimizer} ({impl}) lr {a.lr:g}, momentum {a.momentum:g}, weight decay {a.weight_decay:g}, "
            f"{a.schedule} schedule after {a.warmup_epochs:g} warm-up epoch(s); {a.epochs} epoch(s) of "
            f"{n_train} training images from {a.data}; test set {test_images.size(0)}"
            f"{'; channels_last' if a.channels_last else ''}{'; torch.compile ' + a.compile_mode if a.compile else ''}")

        order = torch.Generator(device=device)
        augment = torch.Generator(device=device)
        augment.manual_seed(a.seed * 1000003 + AUGMENT_STREAM + rank)
        pad = a.crop_padding
        offsets = torch.arange(IMAGE_SIZE, device=device)
        scale = 1.0 / (255.0 * KSTD)
        shift = KMEAN / KSTD

        synchronize()
        start = time.perf_counter()
        # --- The clock runs: upload once -----------------------------------------------------
        padded = F.pad(train_images.to(device), (pad, pad, pad, pad))  # [N, 28 + 2 pad, 28 + 2 pad]
        labels = train_labels.to(device).long()
        test_x = (test_images.to(device).unsqueeze(1).float() * scale - shift).contiguous(memory_format=memory_format)
        test_y = test_labels.to(device).long()

        def epoch_data(epoch):
            order.manual_seed(a.seed * 1000003 + ORDER_STREAM + epoch)
            perm = torch.randperm(n_train, device=device, generator=order)
            mine = perm[rank:shard * world:world][:steps * a.batch_size]
            count = mine.numel()
            top = torch.randint(0, 2 * pad + 1, (count, 1), device=device, generator=augment)
            left = torch.randint(0, 2 * pad + 1, (count, 1), device=device, generator=augment)
            flip = torch.rand((count, 1), device=device, generator=augment) < 0.5
            rows = top + offsets  # [count, 28]
            cols = left + torch.where(flip, IMAGE_SIZE - 1 - offsets, offsets)
            crops = padded[mine[:, None, None], rows[:, :, None], cols[:, None, :]]  # [count, 28, 28]
            x = (crops.unsqueeze(1).float() * scale - shift).contiguous(memory_format=memory_format)
            return x, labels[mine]

        def evaluate():
            eval_model.eval()
            correct = torch.zeros((), dtype=torch.long, device=device)
            with torch.no_grad(), autocast():
                for i in range(0, test_x.size(0), a.eval_batch_size):
                    logits = eval_model(test_x[i:i + a.eval_batch_size])
                    correct += (logits.argmax(1) == test_y[i:i + a.eval_batch_size]).sum()
            eval_model.train()
            return correct.item() / test_x.size(0)

        thresholds = list(TIME_TO)
        if a.target_acc is not None and not any(abs(float(t) - a.target_acc) < 1e-9 for t in thresholds):
            thresholds.append(f"{a.target_acc:.2f}" if round(a.target_acc, 2) == a.target_acc else f"{a.target_acc:g}")
        doc = {
            "system": "pytorch",
            "gpus": world if cuda else 0,
            "processes": world,
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "args": dict(vars(a), world_size=world, optimizer_impl_used=impl, steps_per_epoch=steps),
            "parameters": parameters,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "epochs": [],
            "time_to": {t: None for t in thresholds},
        }
        train_seconds = 0.0
        segment = start
        for epoch in range(a.epochs):
            x, y = epoch_data(epoch)
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for i in range(steps):
                factor = lr_factor(a, epoch + (i + 0.5) / steps)
                for group in optimizer.param_groups:
                    group["lr"] = a.lr * factor
                xb = x[i * a.batch_size:(i + 1) * a.batch_size]
                yb = y[i * a.batch_size:(i + 1) * a.batch_size]
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = F.cross_entropy(model(xb).float(), yb, label_smoothing=a.label_smoothing)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                loss_sum += loss.detach()
            del x, y
            synchronize()
            now = time.perf_counter()
            train_seconds += now - segment
            # --- The clock stops: loss, evaluation, output --------------------------------------
            if distributed:
                dist.all_reduce(loss_sum)
            train_loss = loss_sum.item() / (steps * world)
            acc = evaluate() if lead else 0.0
            stop = torch.tensor([1.0 if a.target_acc is not None and acc >= a.target_acc else 0.0], device=device)
            if distributed:
                dist.broadcast(stop, 0)
            if cuda:
                torch.cuda.synchronize(device)
            eval_seconds = time.perf_counter() - now
            if lead:
                doc["epochs"].append({"epoch": epoch + 1, "seconds": train_seconds, "test_acc": acc,
                                      "train_loss": train_loss, "eval_seconds": eval_seconds})
                for t in thresholds:
                    if doc["time_to"][t] is None and acc >= float(t):
                        doc["time_to"][t] = train_seconds
                if cuda:
                    doc["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                print(f"epoch {epoch + 1:3d}  {train_seconds:9.2f} s  train loss {train_loss:.4f}  "
                      f"test acc {acc:.4f}  (eval {eval_seconds:.2f} s)", flush=True)
                if a.json:
                    write_atomically(a.json, doc)
            synchronize()
            segment = time.perf_counter()
            if stop.item():
                say(f"test accuracy {acc:.4f} reached --target-acc {a.target_acc:g} after epoch {epoch + 1}")
                break
        reached = ", ".join(f"{t}: {'–' if s is None else f'{s:.1f} s'}" for t, s in doc["time_to"].items())
        say(f"{train_seconds:.1f} s of training; time to test accuracy {reached}")
        if a.json:
            say(f"JSON written to {a.json}")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

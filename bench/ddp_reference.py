#!/usr/bin/env python3
"""PyTorch's reference for bench_resnet50: torchvision's ResNet-50 under
torch.nn.parallel.DistributedDataParallel (NCCL), with the same batch, precision, optimizer,
data and timing as the C++ benchmark, writing JSON in the same schema.

usage: bench/ddp_reference.py [--gpus 1,2,4] [--precision fp32,bf16_autocast,fp16_autocast]
                              [--batch-size 64] [--warmup 10] [--iters 30] [--json FILE]
                              [--channels-last] [--no-floor]
                              [--device cpu --arch resnet18 --image-size 32]   (a CPU smoke run)

Precisions (--precision, comma-separated; each is one row per process count):
  fp32           parameters, data and compute in fp32.
  bf16, fp16     the whole model in that dtype: parameters, gradients (so DDP's wire), the
                 optimizer step and the data (model.to(dtype), as bench_resnet50 once did).
  bf16_autocast  fp32 parameters and data; forward and loss under
                 torch.autocast(device, dtype=torch.bfloat16); fp32 gradients on DDP's wire.
  fp16_autocast  as bf16_autocast in float16, with torch.amp.GradScaler at its defaults
                 (scaler.scale(loss).backward(), scaler.step(optimizer), scaler.update()).
                 GPUs only: with --device cpu it is refused.
These are the DDP halves of torch-mpu's policies (include/mpu/precision.h): bench/resnet_report.py
pairs torch-mpu's fp32 with DDP's fp32, bf16_autocast and bf16_mixed with DDP's bf16_autocast,
fp16_autocast and fp16_mixed with DDP's fp16_autocast.

Every row (process count x precision) runs in fresh processes started with
torch.multiprocessing.spawn (MASTER_ADDR/MASTER_PORT set here; no torchrun), one per GPU. Each
rank builds torchvision.models.resnet50(num_classes), moves it to its GPU (in the parameter
dtype of the precision), wraps it in DDP (default bucket size, gradients averaged), and uses
torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4) in its default implementation. The data
are one random batch per rank, made once on the GPU in the parameter dtype; the loss is
cross-entropy of the logits cast to fp32. cudnn.benchmark is on.

Timing per rank: --warmup steps, torch.cuda.synchronize, a barrier, --iters timed steps,
torch.cuda.synchronize. The row's time is the slowest rank's, and
images/s = ranks * batch * iters / time. Also per rank: torch.cuda.max_memory_allocated and
max_memory_reserved over the whole process, and the bytes of the optimizer's state tensors; for
fp16_autocast the final loss scale and the steps GradScaler skipped. (GradScaler.step reads its
overflow flag on the host, a synchronisation per step: that is what its default settings cost,
and it is timed.) A row that fails is recorded with its error and the next one runs.

The forward/backward floor (on unless --no-floor): after the timed steps, each rank times --iters
more iterations of forward, loss and backward alone on the bare model (no DDP, no optimizer, no
GradScaler; gradients set to None before each), under the same autocast. Its images/s
("floor_images_per_s", slowest rank) is what any data-parallel trainer running these same
kernels could reach at most, so floor / DDP is the ceiling of a speed-up over DDP that does not
come from faster forward or backward kernels.

--channels-last converts the model (model.to(memory_format=torch.channels_last)) and the batch,
as PyTorch's performance guide advises for convolutions in reduced precision.

--device cpu runs the same on CPU processes over Gloo (no memory figures; bf16_autocast under
torch.autocast("cpu", dtype=torch.bfloat16)), to check the script where there is no GPU; the
benchmark itself is the GPU run.
"""
import argparse
import datetime
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback

LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4

# Precision name -> (parameter dtype name, autocast dtype name or None, loss scaling).
PRECISIONS = {
    "fp32": ("float32", None, False),
    "bf16": ("bfloat16", None, False),
    "fp16": ("float16", None, False),
    "bf16_autocast": ("float32", "bfloat16", False),
    "fp16_autocast": ("float32", "float16", True),
}
WIRE_NAME = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def optimizer_state_bytes(optimizer):
    import torch

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def run_rank(rank, world, args, precision, port, result_path):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import torchvision

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed + rank)
        param_name, autocast_name, loss_scaling = PRECISIONS[precision]
        dtype = getattr(torch, param_name)
        autocast_dtype = getattr(torch, autocast_name) if autocast_name else None

        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        model = getattr(torchvision.models, args.arch)(num_classes=args.classes).to(device=device, dtype=dtype)
        model = model.to(memory_format=memory_format)
        parameters = sum(p.numel() for p in model.parameters())
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        scaler = torch.amp.GradScaler(device.type) if loss_scaling else None
        initial_scale = scaler.get_scale() if scaler is not None else None

        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(dtype)
        images = images.contiguous(memory_format=memory_format)
        labels = torch.randint(0, args.classes, (args.batch_size,), device=device)

        def forward_loss():
            return F.cross_entropy(ddp(images).float(), labels)

        def step():
            optimizer.zero_grad(set_to_none=True)
            if autocast_dtype is None:
                loss = forward_loss()
            else:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    loss = forward_loss()
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            return loss

        def synchronize():
            if cuda:
                torch.cuda.synchronize(device)

        for _ in range(args.warmup):
            step()
        synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.iters):
            loss = step()
        synchronize()
        seconds = time.perf_counter() - start

        floor_seconds = None
        if not args.no_floor:
            def compute_only():
                for p in model.parameters():
                    p.grad = None
                if autocast_dtype is None:
                    floor_loss = F.cross_entropy(model(images).float(), labels)
                else:
                    with torch.autocast(device.type, dtype=autocast_dtype):
                        floor_loss = F.cross_entropy(model(images).float(), labels)
                floor_loss.backward()

            compute_only()
            synchronize()
            floor_start = time.perf_counter()
            for _ in range(args.iters):
                compute_only()
            synchronize()
            floor_seconds = time.perf_counter() - floor_start

        mine = {
            "seconds": seconds,
            "floor_seconds": floor_seconds,
            "peak_allocated": torch.cuda.max_memory_allocated(device) if cuda else -1,
            "peak_reserved": torch.cuda.max_memory_reserved(device) if cuda else -1,
            "optimizer_state": optimizer_state_bytes(optimizer),
        }
        scaling = {}
        if scaler is not None:
            # Within growth_interval (2000) steps the scale only backs off, once per skipped
            # step, so the halvings count the skipped steps exactly.
            final_scale = scaler.get_scale()
            scaling = {"loss_scale": final_scale,
                       "skipped_steps": round(math.log2(initial_scale / final_scale))
                       if args.warmup + args.iters < 2000 and final_scale > 0 else None}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            seconds_all = [r["seconds"] for r in everyone]
            slowest = max(seconds_all)
            floors = [r["floor_seconds"] for r in everyone if r["floor_seconds"] is not None]
            final_loss = loss.item()
            row = {
                "ok": True,
                "images_per_s": world * args.batch_size * args.iters / slowest,
                "seconds": slowest,
                "rank_seconds": seconds_all,
                "floor_images_per_s": world * args.batch_size * args.iters / max(floors) if floors else None,
                "memory_format": "channels_last" if args.channels_last else "contiguous",
                "peak_allocated_bytes": [r["peak_allocated"] for r in everyone],
                "peak_reserved_bytes": [r["peak_reserved"] for r in everyone],
                "optimizer_state_bytes": [r["optimizer_state"] for r in everyone],
                "final_loss": final_loss if math.isfinite(final_loss) else None,
                "parameters": parameters,
                "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                "backend": "nccl" if cuda else "gloo",
                "param_dtype": WIRE_NAME[param_name],
                "autocast_dtype": WIRE_NAME[autocast_name] if autocast_name else None,
                "wire_dtype": WIRE_NAME[param_name],
                **scaling,
            }
            with open(result_path, "w") as f:
                json.dump(row, f)
            peak = max(row["peak_allocated_bytes"])
            print(f"ddp_reference: {world} x {row['device_name']}, {precision}, ddp: "
                  f"{row['images_per_s']:.1f} images/s"
                  + (f" (forward/backward alone {row['floor_images_per_s']:.1f})" if floors else "")
                  + f", loss {final_loss:.3f}"
                  + (f", peak {peak / 1e9:.2f} GB allocated" if peak >= 0 else "")
                  + f", optimizer state {max(row['optimizer_state_bytes']) / 1e6:.1f} MB on the fullest rank"
                  + (f", loss scale {scaling['loss_scale']:g} ({scaling['skipped_steps']} steps skipped)"
                     if scaling else ""),
                  flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def document(args, rows):
    import torch
    import torchvision

    nccl = None
    if args.device == "cuda":
        version = torch.cuda.nccl.version()
        nccl = ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
    return {
        "benchmark": "resnet_training_throughput",
        "implementation": "ddp",
        "arch": args.arch,
        "device": args.device,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "cuda_version": torch.version.cuda,
        "nccl_version": nccl,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "classes": args.classes,
        "warmup": args.warmup,
        "iters": args.iters,
        "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        "updater": {"ddp_bucket_cap_mb": 25, "gradient_as_bucket_view": False},
        "memory_format": "channels_last" if args.channels_last else "contiguous",
        "precisions": {q: {"param_dtype": WIRE_NAME[PRECISIONS[q][0]],
                           "autocast_dtype": WIRE_NAME[PRECISIONS[q][1]] if PRECISIONS[q][1] else None,
                           "loss_scaling": "torch.amp.GradScaler defaults" if PRECISIONS[q][2] else None}
                       for q in args.precision},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "results": rows,
    }


def write_atomically(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def int_list(text):
    return [int(v) for v in text.split(",") if v]


def str_list(text):
    return [v for v in text.split(",") if v]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int_list, default=[1, 2, 4], help="process counts, comma-separated")
    p.add_argument("--precision", type=str_list, default=None,
                   help=f"comma-separated, of {', '.join(PRECISIONS)} (default: fp32,bf16_autocast,fp16_autocast; "
                        "on --device cpu: fp32,bf16_autocast)")
    p.add_argument("--batch-size", type=int, default=64, help="batch per GPU")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: Gloo processes, to check the script without GPUs")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each CPU process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true", help="model and batch in channels_last")
    p.add_argument("--no-floor", action="store_true", help="skip the forward/backward floor")
    p.add_argument("--json", help="write the results here (rewritten after every row)")
    args = p.parse_args()
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--iters and --batch-size must be at least 1, --warmup at least 0")
    if args.precision is None:
        args.precision = ["fp32", "bf16_autocast"] + (["fp16_autocast"] if args.device == "cuda" else [])
    if not args.precision:
        p.error("--precision: no precision given")
    for precision in args.precision:
        if precision not in PRECISIONS:
            p.error(f"--precision {precision}: valid precisions are {', '.join(PRECISIONS)}")
    if args.device == "cpu" and "fp16_autocast" in args.precision:
        p.error("--precision fp16_autocast needs --device cuda: float16 autocast with GradScaler "
                "is measured on GPUs only; the CPU smoke run takes fp32 and bf16_autocast")

    import torch
    import torch.multiprocessing as mp

    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    rows = []
    failures = 0
    for world in args.gpus:
        for precision in args.precision:
            row = {"gpus": world, "precision": precision, "strategy": "ddp"}
            with tempfile.TemporaryDirectory() as tmp:
                result_path = os.path.join(tmp, "row.json")
                try:
                    if gpus is not None and world > gpus:
                        raise RuntimeError(f"{world} GPUs asked for, {gpus} visible")
                    mp.spawn(run_rank, args=(world, args, precision, free_port(), result_path),
                             nprocs=world, join=True)
                    with open(result_path) as f:
                        row.update(json.load(f))
                except Exception as e:  # a failed row is recorded, and the next one runs
                    failures += 1
                    message = str(e) or traceback.format_exc()
                    row.update({"ok": False, "error": message})
                    first = message.strip().splitlines()[-1] if message.strip() else type(e).__name__
                    print(f"ddp_reference: {world} x {args.device}, {precision}, ddp: FAILED: {first}", flush=True)
            rows.append(row)
            if args.json:
                write_atomically(args.json, document(args, rows))
    if args.json:
        print(f"ddp_reference: JSON written to {args.json}")
    if failures:
        print(f"ddp_reference: {failures} of {len(rows)} rows failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

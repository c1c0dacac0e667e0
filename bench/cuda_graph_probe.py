#!/usr/bin/env python3
"""How much would CUDA graphs give ResNet-50 training at batch 64 on one GPU? torchvision ResNet-50,
SGD momentum 0.9, weight decay 1e-4, synthetic data made once on the device: plain eager steps
against forward+backward captured in a CUDA graph (the optimizer step eager), and against the
whole step captured. Two rounds, fp32 and bf16; prints images/s. Run on a GPU machine:
    python3 bench/cuda_graph_probe.py
"""
import time, sys, torch, torchvision
import torch.nn.functional as F
torch.backends.cudnn.benchmark = True
dev = torch.device("cuda", 0)
def run(dtype, mode, iters=60, warm=10):
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(dev, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(64, 3, 224, 224, device=dev).to(dtype)
    y = torch.randint(0, 1000, (64,), device=dev)
    def fb():
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss
    if mode == "eager":
        def step():
            opt.zero_grad(set_to_none=True); fb(); opt.step()
    else:
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                opt.zero_grad(set_to_none=False); fb(); opt.step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=False)
        with torch.cuda.graph(g):
            for p in model.parameters(): p.grad.zero_()
            fb()
            if mode == "graph_all": opt.step()
        def step():
            g.replay()
            if mode == "graph_fb": opt.step()
    for _ in range(warm): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(iters): step()
    torch.cuda.synchronize(); sec = time.perf_counter() - t
    return 64 * iters / sec
for rnd in range(2):
    for dtype in (torch.float32, torch.bfloat16):
        r = {m: run(dtype, m) for m in ("eager", "graph_fb", "graph_all")}
        print(f"round {rnd} {str(dtype):15s} " + "  ".join(f"{m} {v:7.1f}" for m, v in r.items())
              + f"  graph_fb/eager {r['graph_fb']/r['eager']:.3f}", flush=True)

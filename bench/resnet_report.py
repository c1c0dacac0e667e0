#!/usr/bin/env python3
"""Writes the ResNet-50 section of docs/benchmarks.md from the JSON of bench_resnet50 and
bench/ddp_reference.py, and draws its plot with gnuplot where gnuplot exists. Standard library
only, so that it runs where the benchmark ran and again wherever the JSON is copied to.

usage: bench/resnet_report.py --from DIR [--doc docs/benchmarks.md] [--img docs/img]
                              [--save-data docs/data]

DIR holds what bench/run_resnet_bench.sh wrote: mpu.json (bench_resnet50), ddp.json
(ddp_reference.py) and env.json (card, date, versions); either benchmark's file may be missing.
Rows merged from several runs may carry, in env.json, "provenance" (how they were run, replacing
"in one run of bench/run_resnet_bench.sh") and "notes" (lines printed under the table).
The section replaces what lies between the markers <!-- resnet50:begin --> and
<!-- resnet50:end --> (added before "## Training", or at the end, when absent); the rest of
the file is kept. The section is also written to DIR/resnet50_section.md.

Scaling efficiency = images/s at n / (n * images/s at 1), same strategy and precision.
"x DDP" = images/s / DDP's images/s at the same n and precision.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

BEGIN = "<!-- resnet50:begin -->"
END = "<!-- resnet50:end -->"
PLOT = "resnet50_throughput.png"
STRATEGIES = ["ddp", "master", "replicated", "sharded"]
LABEL = {"ddp": "PyTorch DDP", "master": "torch-mpu master", "replicated": "torch-mpu replicated",
         "sharded": "torch-mpu sharded"}
PRECISIONS = ["fp32", "bf16", "fp16"]
# One colour per implementation in every panel.
COLOUR = {"ddp": "#9400d3", "master": "#009e73", "replicated": "#56b4e9", "sharded": "#e69f00"}
# The goals of issue 8.
GOAL_VS_DDP = 1.05
GOAL_REPLICATED_EFFICIENCY = 0.97
GOAL_MASTER_EFFICIENCY = 0.90
GOAL_SHARDED_SLACK = 0.05
GOAL_GPUS = 4


def merge_rounds(src):
    """Interleaved runs (run_resnet_bench.sh with ROUNDS > 1) leave one JSON per round, process
    count and implementation in SRC/parts: mpu_r<k>_n<n>.json and ddp_r<k>_n<n>.json. Writes
    SRC/mpu.json and SRC/ddp.json with, for each (strategy, precision, GPUs), the row of the
    median images/s (for an even count, the lower middle row with the mean of the middle two
    as its images/s), carrying every round's images/s in "samples". Returns the number of
    rounds seen (0: no parts)."""
    parts = os.path.join(src, "parts")
    if not os.path.isdir(parts):
        return 0
    rounds = set()
    for name in ("mpu", "ddp"):
        docs = []
        mine = set()
        for f in sorted(os.listdir(parts)):
            if f.startswith(name + "_r") and f.endswith(".json"):
                mine.add(f[len(name) + 2:].split("_", 1)[0])
                docs.append(load(os.path.join(parts, f)))
        rounds |= mine
        if not docs:
            continue
        groups = {}
        failed = []
        for doc in docs:
            for row in doc.get("results", []):
                if row.get("ok"):
                    groups.setdefault((row["strategy"], row["precision"], row["gpus"]), []).append(row)
                else:
                    failed.append(row)
        merged = {k: v for k, v in docs[0].items() if k != "results"}
        merged["rounds"] = len(mine)
        merged["results"] = []
        for key in sorted(groups, key=lambda k: (k[1], STRATEGIES.index(k[0]) if k[0] in STRATEGIES else 99, k[2])):
            rows = sorted(groups[key], key=lambda row: row["images_per_s"])
            chosen = dict(rows[(len(rows) - 1) // 2])
            if len(rows) % 2 == 0:
                # An even count: the mean of the middle two, so that the side with the wider
                # spread is not favoured (the lower middle one would be).
                middle = rows[len(rows) // 2 - 1:len(rows) // 2 + 1]
                chosen["images_per_s"] = sum(row["images_per_s"] for row in middle) / 2
            chosen["samples"] = [row["images_per_s"] for row in rows]
            merged["results"].append(chosen)
        # A failure is reported once per row, and only when no round of that row succeeded (the
        # median row then counts fewer samples than rounds).
        seen = set()
        for row in failed:
            key = (row.get("strategy"), row.get("precision"), row.get("gpus"))
            if key not in groups and key not in seen:
                seen.add(key)
                merged["results"].append(row)
        with open(os.path.join(src, f"{name}.json"), "w") as f:
            json.dump(merged, f, indent=2)
    return len(rounds)


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class Results:
    """The rows of both benchmarks, keyed by (strategy, precision, gpus)."""

    def __init__(self, mpu, ddp):
        self.docs = [d for d in (mpu, ddp) if d]
        self.ok = {}
        self.failed = []
        for doc in self.docs:
            for row in doc.get("results", []):
                key = (row["strategy"], row["precision"], row["gpus"])
                if row.get("ok"):
                    self.ok[key] = row
                else:
                    self.failed.append(row)
        self.precisions = [p for p in PRECISIONS if any(k[1] == p for k in self.ok)]
        self.gpus = sorted({k[2] for k in self.ok})
        self.strategies = [s for s in STRATEGIES if any(k[0] == s for k in self.ok)]

    def ips(self, strategy, precision, n):
        row = self.ok.get((strategy, precision, n))
        return row["images_per_s"] if row else None

    def efficiency(self, strategy, precision, n):
        one = self.ips(strategy, precision, 1)
        this = self.ips(strategy, precision, n)
        return this / (n * one) if one and this else None

    def vs_ddp(self, strategy, precision, n):
        ddp = self.ips("ddp", precision, n)
        this = self.ips(strategy, precision, n)
        return this / ddp if ddp and this else None

    def state(self, strategy, precision, n):
        row = self.ok.get((strategy, precision, n))
        return max(row["optimizer_state_bytes"]) if row else None


def fmt(value, spec, suffix=""):
    return "–" if value is None else format(value, spec) + suffix


def gib(value):
    return None if value is None or value < 0 else value / 2**30


def mib(value):
    return None if value is None else value / 2**20


def met(ok):
    return "not measured" if ok is None else ("met" if ok else "**not met**")


def throughput_table(r):
    lines = ["| precision | implementation | GPUs | images/s | scaling efficiency | × DDP "
             "| peak memory, fullest rank (GiB) | optimizer state, fullest rank (MiB) | final loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in r.precisions:
        for s in r.strategies:
            for n in r.gpus:
                row = r.ok.get((s, p, n))
                if not row:
                    continue
                peak = max(row["peak_allocated_bytes"])
                eff = r.efficiency(s, p, n)
                ratio = r.vs_ddp(s, p, n) if s != "ddp" else None
                samples = row.get("samples") or []
                spread = f" ({min(samples):.0f}–{max(samples):.0f})" if len(samples) > 1 else ""
                lines.append(
                    f"| {p} | {LABEL[s]} | {n} | {row['images_per_s']:.1f}{spread} | {fmt(eff and 100 * eff, '.1f', ' %')} "
                    f"| {fmt(ratio, '.3f')} | {fmt(gib(peak), '.2f')} | {fmt(mib(max(row['optimizer_state_bytes'])), '.1f')} "
                    f"| {fmt(row.get('final_loss'), '.4f')} |")
    return lines


def memory_table(r):
    lines = ["| precision | GPUs | replicated (MiB per rank) | sharded (MiB, fullest rank) "
             "| sharded / replicated | goal: ≤ 1/n + 5 % |",
             "|---|---:|---:|---:|---:|---|"]
    rows = 0
    for p in r.precisions:
        for n in r.gpus:
            rep = r.state("replicated", p, n)
            sh = r.state("sharded", p, n)
            if rep is None or sh is None or rep == 0:
                continue
            ratio = sh / rep
            bound = 1 / n + GOAL_SHARDED_SLACK
            lines.append(f"| {p} | {n} | {mib(rep):.1f} | {mib(sh):.1f} | {ratio:.3f} "
                         f"| ≤ {bound:.3f}: {met(ratio <= bound)} |")
            rows += 1
    return lines if rows else []


def goals(r):
    out = []
    for p in ("fp32", "bf16"):
        for n in r.gpus or [1, 2, 4]:
            if n not in (1, 2, 4):
                continue
            ratio = r.vs_ddp("replicated", p, n)
            out.append(f"- Replicated ≥ {GOAL_VS_DDP:.2f}× DDP, {p}, {n} GPU(s): "
                       f"{fmt(ratio, '.3f', '×')}: {met(None if ratio is None else ratio >= GOAL_VS_DDP)}")
    for s, goal in (("replicated", GOAL_REPLICATED_EFFICIENCY), ("master", GOAL_MASTER_EFFICIENCY)):
        for p in ("fp32", "bf16"):
            eff = r.efficiency(s, p, GOAL_GPUS)
            out.append(f"- {s.capitalize()} scaling efficiency ≥ {100 * goal:.0f} % at {GOAL_GPUS} GPUs, {p}: "
                       f"{fmt(eff and 100 * eff, '.1f', ' %')}: {met(None if eff is None else eff >= goal)}")
    for p in ("fp32", "bf16"):
        rep = r.state("replicated", p, GOAL_GPUS)
        sh = r.state("sharded", p, GOAL_GPUS)
        ratio = sh / rep if rep and sh is not None else None
        bound = 1 / GOAL_GPUS + GOAL_SHARDED_SLACK
        out.append(f"- Sharded optimizer state per rank ≤ (1/{GOAL_GPUS} + 5 %) of Replicated's, {p}, "
                   f"{GOAL_GPUS} GPUs: {fmt(ratio, '.3f')} (bound {bound:.3f}): "
                   f"{met(None if ratio is None else ratio <= bound)}")
    return out


def first_line(text):
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def plot(r, png):
    """Images/s against GPUs, one panel per precision. Returns False when gnuplot is missing."""
    if not shutil.which("gnuplot"):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        panels = []
        for p in r.precisions:
            lines = []
            for s in r.strategies:
                if not any(r.ips(s, p, n) is not None for n in r.gpus):
                    continue
                dat = os.path.join(tmp, f"{p}_{s}.dat")
                with open(dat, "w") as f:
                    for n in r.gpus:
                        ips = r.ips(s, p, n)
                        if ips is not None:
                            f.write(f"{n} {ips}\n")
                style = "linespoints lw 2 dt 2 pt 6" if s == "ddp" else "linespoints lw 2 pt 7"
                style += f" lc rgb '{COLOUR[s]}'"
                lines.append(f"'{dat}' using 1:2 with {style} title '{LABEL[s]}'")
            one = r.ips("ddp", p, 1)
            if one:
                lines.append(f"{one} * x with lines lc rgb 'dark-gray' lw 1.5 dt 3 title 'DDP at 1 GPU x n (linear scaling)'")
            panels.append(f"set title '{arch_label(r)} training, {p}, batch {batch(r)} per GPU'\n"
                          f"plot {', '.join(lines)}\n")
        width = 560 * max(1, len(panels))
        # Headroom above the highest point, so that the key (top left) does not cover the lines.
        top = 1.4 * max(row["images_per_s"] for row in r.ok.values())
        script = f"""
set terminal pngcairo noenhanced size {width},460
set output '{png}'
set xlabel 'GPUs'
set ylabel 'images/s'
set xtics ({', '.join(str(n) for n in r.gpus)})
set xrange [{min(r.gpus) - 0.3}:{max(r.gpus) + 0.3}]
set yrange [0:{top:.0f}]
set key left top Left reverse
set grid
set multiplot layout 1,{max(1, len(panels))}
{''.join(panels)}
unset multiplot
"""
        subprocess.run(["gnuplot"], input=script.encode(), check=True)
    return True


def arch_label(r):
    arch = r.docs[0].get("arch", "resnet50") if r.docs else "resnet50"
    return {"resnet50": "ResNet-50", "resnet18": "ResNet-18"}.get(arch, arch)


def parameters(r):
    counts = sorted({row["parameters"] for row in r.ok.values() if "parameters" in row})
    return ", ".join(f"{c:,}" for c in counts) or "?"


def batch(r):
    return r.docs[0].get("batch_size") if r.docs else "?"


def rounds_text(mpu, ddp):
    rounds = max((d or {}).get("rounds", 1) for d in (mpu, ddp))
    if rounds <= 1:
        return ""
    counts = {len(row.get("samples") or [row]) for d in (mpu, ddp) if d for row in d.get("results", [])
              if row.get("ok")}
    if counts == {rounds}:
        return (f". Each row is the median of {rounds} rounds, run interleaved (every process count: "
                f"torch-mpu, then DDP, round after round); the lowest and highest follow in brackets")
    return (f". Rows measured in more than one of the {rounds} rounds show the median of their rounds "
            f"(the mean of the middle two for an even count), the lowest and highest in brackets")


def section(r, mpu, ddp, env, plotted):
    doc = mpu or ddp or {}
    names = env.get("gpus") or []
    cards = sorted({n.split(" (UUID")[0].split(": ", 1)[-1] for n in names}) or sorted(
        {row.get("device_name") for row in r.ok.values() if row.get("device_name")})
    host = f"{len(names)}×{', '.join(cards)}" if names else ", ".join(cards) or "unknown card"
    lines = [BEGIN, "", "## ResNet-50 training throughput against PyTorch DDP "
             "(`bench/bench_resnet50`, `bench/ddp_reference.py`)", ""]
    lines.append(
        f"On a **{host}** host, {env.get('date', 'date unknown')}, "
        f"{env.get('provenance') or 'in one run of `bench/run_resnet_bench.sh`'}. torch-mpu {(mpu or {}).get('mpu_version', '?')}"
        f"{' (commit ' + env['git_commit'] + ')' if env.get('git_commit') else ''} on LibTorch "
        f"{(mpu or {}).get('torch_version', '?')}; DDP on PyTorch {(ddp or {}).get('torch_version', env.get('torch', '?'))}, "
        f"torchvision {(ddp or {}).get('torchvision_version', env.get('torchvision', '?'))}; CUDA "
        f"{(ddp or {}).get('cuda_version') or env.get('cuda', '?')}, NCCL {(ddp or {}).get('nccl_version') or env.get('nccl', '?')}"
        f"{', driver ' + env['driver'] if env.get('driver') else ''}.")
    lines.append("")
    opt = doc.get("optimizer", {})
    upd = (mpu or {}).get("updater", {})
    wires = sorted({row.get("wire_dtype") for (s, _, _), row in r.ok.items() if s != "ddp" and row.get("wire_dtype")})
    lines.append(
        f"{arch_label(r)} ({parameters(r)} parameters, torchvision's architecture: `examples/resnet/models.cpp` "
        f"for torch-mpu, `torchvision.models` for DDP). Synthetic ImageNet-shaped data ({doc.get('image_size', '?')}×{doc.get('image_size', '?')}, "
        f"{doc.get('classes', '?')} classes), one batch of {doc.get('batch_size', '?')} per GPU made once on the "
        f"device in the training dtype; SGD lr {opt.get('lr', '?')}, momentum {opt.get('momentum', '?')}, "
        f"weight decay {opt.get('weight_decay', '?')}; bf16 means bf16 parameters. {doc.get('warmup', '?')} "
        f"warm-up and {doc.get('iters', '?')} timed iterations, between device synchronisations; the slowest "
        f"rank's time; images/s = GPUs × batch × iterations / time"
        f"{rounds_text(mpu, ddp)}. Peak memory is the CUDA caching "
        f"allocator's peak allocated bytes of the fullest rank over the whole process "
        f"(`torch.cuda.max_memory_allocated` for DDP). Both benchmarks draw the initial weights and the "
        f"data from the same seeds. The final loss (rank 0's last batch) is shown only as a sign of life: "
        f"with random labels and lr 0.1 the loss wanders chaotically, so the values are not comparable "
        f"between rows. torch-mpu: `mpu::DistributedUpdater`, buckets of "
        f"{mib(upd.get('bucket_bytes')) if upd.get('bucket_bytes') is not None else '?'} MiB, gradients on the wire in "
        f"{', '.join(wires) or '?'}, flat optimizer step {'on' if upd.get('flat_step', True) else 'off'}; DDP: "
        f"default buckets (25 MiB), gradients in the parameter dtype, `torch.optim.SGD`'s default implementation.")
    lines.append("")
    if r.ok:
        lines += throughput_table(r)
        lines.append("")
    else:
        lines += ["No row succeeded.", ""]
    notes = env.get("notes") or []
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    mem = memory_table(r)
    if mem:
        lines += ["Optimizer state (SGD momentum) per rank, Sharded against Replicated:", ""] + mem + [""]
    if plotted:
        lines += [f"![ResNet-50 images/s against GPUs](img/{PLOT})", ""]
    else:
        lines += ["(The plot was not drawn: no gnuplot where this report was made. "
                  "`bench/resnet_report.py --from DIR` draws it from the same JSON.)", ""]
    lines += ["Goals of issue 8:", ""] + goals(r) + [""]
    if r.failed:
        lines += ["Rows that failed:", ""]
        for row in r.failed:
            lines.append(f"- {row['precision']}, {LABEL.get(row['strategy'], row['strategy'])}, "
                         f"{row['gpus']} GPU(s): {first_line(row.get('error', ''))}")
        lines.append("")
    data = env.get("data_files")
    if data:
        lines += [f"Raw JSON: {', '.join('[' + os.path.basename(d) + '](data/' + os.path.basename(d) + ')' for d in data)}.", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_section(doc_path, text):
    old = open(doc_path).read() if os.path.exists(doc_path) else "# Benchmarks\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + text.rstrip("\n") + tail
    elif "\n## Training" in old:
        head, tail = old.split("\n## Training", 1)
        new = head.rstrip("\n") + "\n\n" + text + "\n## Training" + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(doc_path, "w") as f:
        f.write(new)


def save_data(src_dir, mpu, ddp, env, dest):
    """Copies the JSON into `dest` under names that carry the host and the date."""
    os.makedirs(dest, exist_ok=True)
    names = env.get("gpus") or []
    card = "unknown"
    if names:
        card = names[0].split(" (UUID")[0].split(": ", 1)[-1].replace("NVIDIA ", "").split()[0]
    host = f"{len(names)}x{card}"
    date = env.get("date", "undated")[:10]
    saved = []
    for name, doc in (("mpu", mpu), ("ddp", ddp)):
        if doc is None:
            continue
        target = os.path.join(dest, f"resnet50_{name}_{host}_{date}.json")
        shutil.copyfile(os.path.join(src_dir, f"{name}.json"), target)
        saved.append(target)
    return saved


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, help="the directory run_resnet_bench.sh wrote")
    p.add_argument("--doc", default="docs/benchmarks.md")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--save-data", help="copy the JSON into this directory (docs/data) and link it")
    a = p.parse_args()
    rounds = merge_rounds(a.src)
    if rounds:
        print(f"resnet_report.py: merged {rounds} rounds from {a.src}/parts (median rows)")
    mpu = load(os.path.join(a.src, "mpu.json"))
    ddp = load(os.path.join(a.src, "ddp.json"))
    env = load(os.path.join(a.src, "env.json")) or {}
    if mpu is None and ddp is None:
        sys.exit(f"resnet_report.py: neither {a.src}/mpu.json nor {a.src}/ddp.json exists")
    r = Results(mpu, ddp)
    if a.save_data:
        env["data_files"] = save_data(a.src, mpu, ddp, env, a.save_data)
    plotted = False
    if r.ok:
        os.makedirs(a.img, exist_ok=True)
        plotted = plot(r, os.path.join(a.img, PLOT))
        if not plotted:
            print("resnet_report.py: no gnuplot here, so no plot; run "
                  f"`bench/resnet_report.py --from {a.src}` where gnuplot exists to draw it")
    text = section(r, mpu, ddp, env, plotted)
    with open(os.path.join(a.src, "resnet50_section.md"), "w") as f:
        f.write(text)
    replace_section(a.doc, text)
    print(f"resnet_report.py: wrote the ResNet-50 section of {a.doc}"
          + (f" and {os.path.join(a.img, PLOT)}" if plotted else ""))
    for line in goals(r):
        print(line)


if __name__ == "__main__":
    main()

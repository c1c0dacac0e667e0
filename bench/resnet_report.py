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

Precisions are torch-mpu's policies (include/mpu/precision.h): fp32, bf16_autocast,
fp16_autocast, bf16_mixed, fp16_mixed, and the older bf16 and fp16 (the whole model in that
dtype). Each torch-mpu row is compared with one DDP row (bench/ddp_reference.py): the same
precision, except bf16_mixed against DDP's bf16_autocast and fp16_mixed against DDP's
fp16_autocast (DDP has no fp32 master copy; autocast is what a PyTorch user runs instead).

Scaling efficiency = images/s at n / (n * images/s at 1), same strategy and precision.
"x DDP" = images/s / the paired DDP row's images/s at the same n.
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
PRECISIONS = ["fp32", "bf16", "fp16", "bf16_autocast", "bf16_mixed", "fp16_autocast", "fp16_mixed"]
# The DDP precision each torch-mpu precision is compared with; the same name where absent.
DDP_PARTNER = {"bf16_mixed": "bf16_autocast", "fp16_mixed": "fp16_autocast"}
# The reduced-precision policies of issue 20, held to GOAL_POLICY_VS_DDP.
POLICIES = ["bf16_autocast", "bf16_mixed", "fp16_autocast", "fp16_mixed"]
# One colour per implementation in every panel.
COLOUR = {"ddp": "#9400d3", "master": "#009e73", "replicated": "#56b4e9", "sharded": "#e69f00"}
# The goals of issue 8.
GOAL_VS_DDP = 1.05
GOAL_REPLICATED_EFFICIENCY = 0.97
GOAL_MASTER_EFFICIENCY = 0.90
GOAL_SHARDED_SLACK = 0.05
GOAL_GPUS = 4
# The goal of issue 20: every reduced-precision policy, Replicated, against its DDP partner.
GOAL_POLICY_VS_DDP = 1.10
GOAL_POLICY_STRATEGY = "replicated"


def ddp_partner(precision):
    """The precision of the DDP row that a torch-mpu row of `precision` is compared with."""
    return DDP_PARTNER.get(precision, precision)


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
        seen = {k[1] for k in self.ok}
        self.precisions = [p for p in PRECISIONS if p in seen] + sorted(seen - set(PRECISIONS))
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
        ddp = self.ips("ddp", ddp_partner(precision), n)
        this = self.ips(strategy, precision, n)
        return this / ddp if ddp and this else None

    def floor(self, precision, n):
        """DDP's forward/backward alone (bench/ddp_reference.py's floor), images/s, or None."""
        row = self.ok.get(("ddp", precision, n))
        return (row or {}).get("floor_images_per_s")

    def state(self, strategy, precision, n):
        row = self.ok.get((strategy, precision, n))
        return max(row["optimizer_state_bytes"]) if row else None

    def peak(self, strategy, precision, n):
        """Peak allocated bytes of the fullest rank, or None (not measured, or on CPUs)."""
        row = self.ok.get((strategy, precision, n))
        peaks = [b for b in (row or {}).get("peak_allocated_bytes") or [] if b is not None and b >= 0]
        return max(peaks) if peaks else None


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


def policy_table(r):
    """Each torch-mpu precision beside its DDP partner: images/s, the speed-up, and the peak
    memory of the fullest rank of both."""
    floors = any(r.floor(partner, n) for partner in {ddp_partner(p) for p in r.precisions} for n in r.gpus)
    lines = ["| precision | torch-mpu strategy | GPUs | images/s | DDP precision | DDP images/s | × DDP "
             f"| goal ≥ {GOAL_POLICY_VS_DDP:.2f}× "
             + ("| DDP's forward/backward alone (images/s) | ceiling: alone / DDP " if floors else "")
             + "| peak, torch-mpu (GiB per rank) | peak, DDP (GiB per rank) | peak / DDP's |",
             "|---|---|---:|---:|---|---:|---:|---|" + ("---:|---:|" if floors else "") + "---:|---:|---:|"]
    rows = 0
    for p in r.precisions:
        partner = ddp_partner(p)
        for s in r.strategies:
            if s == "ddp":
                continue
            for n in r.gpus:
                ips = r.ips(s, p, n)
                if ips is None:
                    continue
                ddp_ips = r.ips("ddp", partner, n)
                ratio = r.vs_ddp(s, p, n)
                goal = "–" if p not in POLICIES else met(None if ratio is None else ratio >= GOAL_POLICY_VS_DDP)
                mine = r.peak(s, p, n)
                theirs = r.peak("ddp", partner, n)
                floor = r.floor(partner, n)
                ceiling = (f"| {fmt(floor, '.1f')} | {fmt(floor / ddp_ips if floor and ddp_ips else None, '.3f', '×')} "
                           if floors else "")
                lines.append(f"| {p} | {s} | {n} | {ips:.1f} | {partner} | {fmt(ddp_ips, '.1f')} "
                             f"| {fmt(ratio, '.3f', '×')} | {goal} {ceiling}| {fmt(gib(mine), '.2f')} "
                             f"| {fmt(gib(theirs), '.2f')} | {fmt(mine / theirs if mine and theirs else None, '.3f')} |")
                rows += 1
    return lines if rows else []


def policy_goals(r):
    out = []
    measured = [p for p in POLICIES if p in r.precisions] or POLICIES
    for p in measured:
        for n in r.gpus or [1, 2, 4]:
            ratio = r.vs_ddp(GOAL_POLICY_STRATEGY, p, n)
            out.append(f"- {GOAL_POLICY_STRATEGY.capitalize()} {p} ≥ {GOAL_POLICY_VS_DDP:.2f}× DDP "
                       f"{ddp_partner(p)}, {n} GPU(s): {fmt(ratio, '.3f', '×')}: "
                       f"{met(None if ratio is None else ratio >= GOAL_POLICY_VS_DDP)}")
    return out


def goals(r):
    out = []
    for p in [q for q in ("fp32", "bf16") if q == "fp32" or q in r.precisions]:
        for n in r.gpus or [1, 2, 4]:
            if n not in (1, 2, 4):
                continue
            ratio = r.vs_ddp("replicated", p, n)
            out.append(f"- Replicated ≥ {GOAL_VS_DDP:.2f}× DDP, {p}, {n} GPU(s): "
                       f"{fmt(ratio, '.3f', '×')}: {met(None if ratio is None else ratio >= GOAL_VS_DDP)}")
    issue8 = [q for q in ("fp32", "bf16") if q == "fp32" or q in r.precisions]
    for s, goal in (("replicated", GOAL_REPLICATED_EFFICIENCY), ("master", GOAL_MASTER_EFFICIENCY)):
        for p in issue8:
            eff = r.efficiency(s, p, GOAL_GPUS)
            out.append(f"- {s.capitalize()} scaling efficiency ≥ {100 * goal:.0f} % at {GOAL_GPUS} GPUs, {p}: "
                       f"{fmt(eff and 100 * eff, '.1f', ' %')}: {met(None if eff is None else eff >= goal)}")
    for p in issue8:
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
        # A DDP-only precision (bf16_autocast with no torch-mpu row of it) still gets its panel;
        # a torch-mpu precision's panel draws its DDP partner.
        for p in r.precisions:
            partner = ddp_partner(p)
            lines = []
            for s in r.strategies:
                q = partner if s == "ddp" else p
                if not any(r.ips(s, q, n) is not None for n in r.gpus):
                    continue
                dat = os.path.join(tmp, f"{p}_{s}.dat")
                with open(dat, "w") as f:
                    for n in r.gpus:
                        ips = r.ips(s, q, n)
                        if ips is not None:
                            f.write(f"{n} {ips}\n")
                style = "linespoints lw 2 dt 2 pt 6" if s == "ddp" else "linespoints lw 2 pt 7"
                style += f" lc rgb '{COLOUR[s]}'"
                title = LABEL[s] + (f" ({q})" if q != p else "")
                lines.append(f"'{dat}' using 1:2 with {style} title '{title}'")
            mpu_lines = any(r.ips(s, p, n) is not None for s in r.strategies if s != "ddp" for n in r.gpus)
            shown_elsewhere = any(o != p and ddp_partner(o) == p for o in r.precisions)
            if not lines or (not mpu_lines and shown_elsewhere):
                continue
            one = r.ips("ddp", partner, 1)
            if one:
                lines.append(f"{one} * x with lines lc rgb 'dark-gray' lw 1.5 dt 3 title 'DDP at 1 GPU x n (linear scaling)'")
            panels.append(f"set title '{arch_label(r)} training, {p}, batch {batch(r)} per GPU'\n"
                          f"plot {', '.join(lines)}\n")
        columns = min(3, max(1, len(panels)))
        rows = max(1, -(-len(panels) // columns))
        # Headroom above the highest point, so that the key (top left) does not cover the lines.
        top = 1.4 * max(row["images_per_s"] for row in r.ok.values())
        script = f"""
set terminal pngcairo noenhanced size {560 * columns},{460 * rows}
set output '{png}'
set xlabel 'GPUs'
set ylabel 'images/s'
set xtics ({', '.join(str(n) for n in r.gpus)})
set xrange [{min(r.gpus) - 0.3}:{max(r.gpus) + 0.3}]
set yrange [0:{top:.0f}]
set key left top Left reverse
set grid
set multiplot layout {rows},{columns}
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


def cl_text(mpu, ddp):
    """The memory format, when a side ran channels_last; else empty."""
    if (mpu or {}).get("memory_format") != "channels_last" and (ddp or {}).get("memory_format") != "channels_last":
        return ""
    return (", in channels_last (DDP: `model.to(memory_format=torch.channels_last)` and the batch; torch-mpu: "
            "the batch, so that cuDNN runs every convolution in channels_last while the parameters stay "
            "contiguous views into the flat buffer)")


def precision_text(r):
    """What the precisions of the table mean, for those present; ends in a space when not empty."""
    text = {
        "bf16": "bf16 and fp16: the whole model in that dtype (parameters, gradients, step)",
        "bf16_autocast": "*_autocast: fp32 parameters, forward and loss under autocast to that dtype "
                         "(fp16 with dynamic loss scaling; `torch.amp.GradScaler` at its defaults for DDP)",
        "bf16_mixed": "*_mixed (torch-mpu only): parameters in that dtype for compute, gradients in it, "
                      "and an fp32 master copy in the flat buffer that the optimizer steps, compared with "
                      "DDP's autocast in the same dtype",
    }
    family = {"fp16": "bf16", "fp16_autocast": "bf16_autocast", "fp16_mixed": "bf16_mixed"}
    parts = []
    for p in r.precisions:
        key = family.get(p, p)
        if key in text and text[key] not in parts:
            parts.append(text[key])
    return ("Precisions: " + "; ".join(parts) + ". ") if parts else ""


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
        f"device in the parameter dtype{cl_text(mpu, ddp)}; SGD lr {opt.get('lr', '?')}, momentum {opt.get('momentum', '?')}, "
        f"weight decay {opt.get('weight_decay', '?')}. {precision_text(r)}{doc.get('warmup', '?')} "
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
    policies = policy_table(r)
    if policies:
        lines += ["Precision policies against DDP (each torch-mpu row beside the DDP row it is compared "
                  "with; peak memory is the fullest rank's):", ""] + policies + [""]
    lines += ["Goals of issue 8:", ""] + goals(r) + [""]
    if any(p in r.precisions for p in POLICIES):
        lines += ["Goals of issue 20:", ""] + policy_goals(r) + [""]
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
    policies = policy_table(r)
    if policies:
        print("\n".join(policies))
    for line in goals(r):
        print(line)
    if any(q in r.precisions for q in POLICIES):
        for line in policy_goals(r):
            print(line)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Turns what bench/run_fmnist_tta.sh wrote into a time-to-accuracy table and plot.

usage: bench/tta_report.py --from DIR [--md FILE] [--png FILE]

Reads DIR/mpu_<precision>_n<gpus>/log (mpu_resnet's LogReport: per epoch "elapsed_time",
"eval_seconds" (the evaluations' total so far) and "validation/main/accuracy") and
DIR/ref_<precision>_n<gpus>.json (bench/torch_fmnist_reference.py: per epoch "seconds", already
without evaluation, and "test_acc"). For both, the training seconds at the end of epoch e are the
wall clock from the start of training (data upload included) minus the evaluations before it.
Writes DIR/tta.md (default) with one row per run: the test accuracy after the last epoch and the
best, the seconds to reach 90, 94 and 95 % (the end of the first epoch at or above), the median
epoch time (the first epoch left out: it carries start-up), and for torch-mpu rows the ratio of the
reference's time to 94 % (and to its own best common accuracy) over torch-mpu's; with several GPU
counts, the epoch time against one GPU's. DIR/tta.png (default) plots accuracy against seconds,
when gnuplot exists.
"""
import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

THRESHOLDS = (0.90, 0.94, 0.95)


def load_mpu(path):
    with open(path) as f:
        rows = json.load(f)
    epochs = []
    for row in rows:
        acc = row.get("validation/main/accuracy")
        if acc is None:
            continue
        epochs.append({"epoch": row["epoch"], "seconds": row["elapsed_time"] - row.get("eval_seconds", 0.0),
                       "test_acc": acc})
    return epochs


def load_ref(path):
    with open(path) as f:
        doc = json.load(f)
    return [{"epoch": e["epoch"], "seconds": e["seconds"], "test_acc": e["test_acc"]} for e in doc.get("epochs", [])]


def runs(src):
    found = []
    for d in sorted(glob.glob(os.path.join(src, "mpu_*_n*"))):
        m = re.match(r"mpu_(.+)_n(\d+)$", os.path.basename(d))
        log = os.path.join(d, "log")
        if m and os.path.isfile(log):
            found.append({"system": "torch-mpu", "precision": m.group(1), "gpus": int(m.group(2)),
                          "epochs": load_mpu(log)})
    for f in sorted(glob.glob(os.path.join(src, "ref_*_n*.json"))):
        m = re.match(r"ref_(.+)_n(\d+)\.json$", os.path.basename(f))
        if m:
            found.append({"system": "PyTorch", "precision": m.group(1), "gpus": int(m.group(2)),
                          "epochs": load_ref(f)})
    return [r for r in found if r["epochs"]]


def time_to(run, threshold):
    for e in run["epochs"]:
        if e["test_acc"] >= threshold:
            return e["seconds"]
    return None


def epoch_time(run):
    s = [e["seconds"] for e in run["epochs"]]
    d = [b - a for a, b in zip(s, s[1:])]
    return statistics.median(d) if d else (s[0] if s else None)


def fmt(v, spec, suffix=""):
    return "–" if v is None else format(v, spec) + suffix


def table(all_runs):
    lines = ["| system | precision | GPUs | epochs | final test acc. | best | to 90 % (s) | to 94 % (s) "
             "| to 95 % (s) | epoch (s) | training (s) | PyTorch's time to 94 % / this | epoch time / 1 GPU's |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    refs = {r["gpus"]: r for r in all_runs if r["system"] == "PyTorch"}
    for r in all_runs:
        ep = r["epochs"]
        t94 = time_to(r, 0.94)
        ref = refs.get(r["gpus"])
        ratio = None
        if r["system"] == "torch-mpu" and ref is not None and t94 and time_to(ref, 0.94):
            ratio = time_to(ref, 0.94) / t94
        one = next((q for q in all_runs if q["system"] == r["system"] and q["precision"] == r["precision"]
                    and q["gpus"] == 1), None)
        scale = epoch_time(r) / epoch_time(one) if one is not None and r["gpus"] > 1 else None
        lines.append(f"| {r['system']} | {r['precision']} | {r['gpus']} | {len(ep)} | {100 * ep[-1]['test_acc']:.2f} % "
                     f"| {100 * max(e['test_acc'] for e in ep):.2f} % | {fmt(time_to(r, 0.90), '.2f')} "
                     f"| {fmt(t94, '.2f')} | {fmt(time_to(r, 0.95), '.2f')} | {fmt(epoch_time(r), '.3f')} "
                     f"| {ep[-1]['seconds']:.2f} | {fmt(ratio, '.2f', '×')} | {fmt(scale, '.3f', '×')} |")
    return lines


def plot(all_runs, src, png):
    if shutil.which("gnuplot") is None:
        return False
    dats = []
    for r in all_runs:
        name = f"{r['system']} {r['precision']}, {r['gpus']} GPU(s)"
        dat = os.path.join(src, f"tta_{r['system'].replace(' ', '_')}_{r['precision']}_n{r['gpus']}.dat")
        with open(dat, "w") as f:
            f.write("# seconds test_accuracy_percent\n")
            for e in r["epochs"]:
                f.write(f"{e['seconds']:.4f} {100 * e['test_acc']:.3f}\n")
        dats.append((dat, name))
    script = [f"set terminal pngcairo size 900,560", f"set output '{png}'",
              "set title 'ResNet-18 on Fashion-MNIST: test accuracy against training seconds'",
              "set xlabel 'training seconds (data upload included, evaluation left out)'",
              "set ylabel 'test accuracy (%)'", "set key bottom right", "set grid",
              "set yrange [85:96]", "set arrow from graph 0, first 94 to graph 1, first 94 nohead dt 2"]
    script.append("plot " + ", ".join(f"'{d}' using 1:2 with linespoints title '{n}'" for d, n in dats))
    subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True)
    p.add_argument("--md")
    p.add_argument("--png")
    a = p.parse_args()
    all_runs = runs(a.src)
    if not all_runs:
        sys.exit(f"tta_report.py: no run found in {a.src}")
    lines = table(all_runs)
    png = a.png or os.path.join(a.src, "tta.png")
    if plot(all_runs, a.src, png):
        lines += ["", f"![time to accuracy]({os.path.basename(png)})"]
    text = "\n".join(lines) + "\n"
    with open(a.md or os.path.join(a.src, "tta.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

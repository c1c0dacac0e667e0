#!/usr/bin/env python3
"""Draws the PNG plots of docs/benchmarks.md from the benchmarks' JSON output, with gnuplot.

usage: bench/plot_results.py --collectives FILE.json --flat FILE.json --out docs/img
"""
import argparse
import json
import os
import subprocess
import tempfile


def plot_collectives(path, out):
    data = json.load(open(path))
    ops = sorted({r["op"] for r in data["results"]})
    with tempfile.TemporaryDirectory() as tmp:
        lines = []
        for i, op in enumerate(ops):
            dat = os.path.join(tmp, f"op{i}.dat")
            with open(dat, "w") as f:
                for r in data["results"]:
                    if r["op"] == op:
                        f.write(f'{r["bytes"] / 2**20} {r["comm"]["busbw_gbs"]} {r["raw"]["busbw_gbs"]}\n')
            lines.append(f"'{dat}' using 1:2 with linespoints lw 2 title '{op} (torch-mpu)'")
            lines.append(f"'{dat}' using 1:3 with lines dt 2 title '{op} (raw NCCL)'")
        png = os.path.join(out, "collectives_busbw.png")
        script = f"""
set terminal pngcairo noenhanced size 900,520
set output '{png}'
set title "Bus bandwidth, {data['ranks']} ranks, {data['backend']} {data['dtype']}"
set xlabel 'message size (MiB)'
set ylabel 'busbw (GB/s)'
set logscale x 2
set key left top
set grid
plot {', '.join(lines)}
"""
        subprocess.run(["gnuplot"], input=script.encode(), check=True)
    return png


def plot_flat(path, out):
    data = json.load(open(path))
    rows = [r for r in data["results"] if r["config"] in ("fp32", "fp16")]
    with tempfile.TemporaryDirectory() as tmp:
        dat = os.path.join(tmp, "flat.dat")
        with open(dat, "w") as f:
            for r in rows:
                label = f'{r["config"]} {r["op"]}: {r["impl"].split(" (")[0]}'
                f.write(f'"{label}" {r["gbps"]}\n')
        png = os.path.join(out, "flat_buffer_gbps.png")
        script = f"""
set terminal pngcairo noenhanced size 1000,560
set output '{png}'
set title "Gather/scatter of ResNet-50's 161 tensors, {data['device']}"
set ylabel 'GB/s (bytes read + written)'
set style fill solid 0.6
set boxwidth 0.7
set xtics rotate by 35 right font ',8'
set bmargin 12
set lmargin 16
set grid ytics
plot '{dat}' using 0:2:xtic(1) with boxes notitle
"""
        subprocess.run(["gnuplot"], input=script.encode(), check=True)
    return png


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--collectives")
    p.add_argument("--flat")
    p.add_argument("--out", default="docs/img")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.collectives:
        print(plot_collectives(a.collectives, a.out))
    if a.flat:
        print(plot_flat(a.flat, a.out))


if __name__ == "__main__":
    main()

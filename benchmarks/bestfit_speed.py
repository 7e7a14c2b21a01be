"""Best-fit packing per window, this tree's packer against another commit's, side by side.

    python benchmarks/bestfit_speed.py [--against 1c0a70e] [--units 40] [--rounds 6]
                                       [--warmup 0]

Shape: B=32, T=2048, the default buffer (1000 documents, min_tail 32, age rule 8000);
units of 1,024 documents (a FineWeb-Edu row group) of lognormal lengths (median 600
tokens, sigma 1), random token ids. Times `ready()` (packing the window) and `fill()`
(copying it out and writing the position) separately, in CPU time, over every window
of a fresh packer (`--warmup N`: all but its first N windows, as a daemon's long-lived
packer sees them); `--rounds` runs, the two packers alternating which goes first. Prints
each round, both packers' figures and the ratios (the other commit's time over this
tree's), then the medians and the best. The other commit's `producer/bestfit.py` is read
with `git show` (0.1.0 is 1c0a70e), with that commit's codec and reference table.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tokenfeed.producer.bestfit import BestFitPacker

B, T = 32, 2048


def _module_at(commit: str, path: str, name: str, replace: tuple[str, str] = ("", "")) -> Any:
    """`path` as it was at `commit`, imported as module `name` (`replace`: an edit first)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], check=True,
                            capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source.replace(*replace) if replace[0] else source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_packer(commit: str) -> Any:
    """The BestFitPacker of `commit`, with that commit's position codec and reference
    table (when it had them), not this tree's."""
    bestfit = subprocess.run(["git", "show", f"{commit}:producer/bestfit.py"], check=True,
                             capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent).stdout
    tag = commit.replace("/", "_").replace("~", "_").replace("^", "_")
    for module, line in (("bestfit_codec", "from tokenfeed.producer import bestfit_codec"),
                         ("bestfit_refs", "from tokenfeed.producer.bestfit_refs import RefTable")):
        if line in bestfit:
            name = f"{module}_{tag}"
            _module_at(commit, f"producer/{module}.py", name)
            imported = (f"import {name} as {module}" if line.endswith(module)
                        else f"from {name} import RefTable")
            bestfit = bestfit.replace(line, imported)
    file = Path(tempfile.mkdtemp()) / f"bestfit_{tag}.py"
    file.write_text(bestfit)
    spec = importlib.util.spec_from_file_location(f"bestfit_{tag}", file)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[f"bestfit_{tag}"] = loaded
    spec.loader.exec_module(loaded)
    return loaded.BestFitPacker


def make_units(n: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    units = []
    for u in range(n):
        lengths = np.maximum(1, rng.lognormal(np.log(600), 1.0, 1024).astype(np.int64))
        tokens = rng.integers(0, 50_000, int(lengths.sum()), dtype=np.int64).astype(np.uint32)
        units.append((u, tokens, np.cumsum(lengths) - lengths))
    return units


def run(packer_class: Any, units: list[tuple[int, np.ndarray, np.ndarray]], warmup: int = 0
        ) -> tuple[float, float, int]:
    """ms of CPU a window packing and filling, over the windows after the first `warmup`."""
    packer = packer_class(B, T)
    out = np.empty(B * (T + 1), dtype=np.uint32)
    pack_s = fill_s = 0.0
    windows = 0
    for unit, tokens, starts in units:
        packer.push(unit, tokens, starts)
        while True:
            t0 = time.thread_time()
            ready = packer.ready()
            t1 = time.thread_time()
            if windows >= warmup:
                pack_s += t1 - t0
            if not ready:
                break
            packer.fill(out)
            if windows >= warmup:
                fill_s += time.thread_time() - t1
            windows += 1
    timed = windows - warmup
    if timed < 1:
        raise SystemExit(f"--warmup {warmup} leaves no window of {windows}: pass more --units")
    return pack_s / timed * 1e3, fill_s / timed * 1e3, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default="1c0a70e")
    parser.add_argument("--units", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=0,
                        help="windows of each fresh packer left out of the timing")
    args = parser.parse_args()
    contenders = {args.against: load_packer(args.against), "this tree": BestFitPacker}
    units = make_units(args.units)
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in contenders}
    print(f"ms of CPU a window, pack + fill = total; ratio: {args.against} over this tree")
    for i in range(args.rounds):
        order = list(contenders) if i % 2 else list(reversed(contenders))
        for name in order:
            results[name].append(run(contenders[name], units, args.warmup))
        (p0, f0, _), (p1, f1, _) = (results[name][-1] for name in contenders)
        print(f"round {i + 1}: {args.against} {p0:.3f} + {f0:.3f} = {p0 + f0:.3f}; this tree "
              f"{p1:.3f} + {f1:.3f} = {p1 + f1:.3f}; ratio pack {p0 / p1:.2f}x, fill "
              f"{f0 / f1:.2f}x, total {(p0 + f0) / (p1 + f1):.2f}x")
    (before, after) = (results[name] for name in contenders)
    for label, pick in (("median", statistics.median), ("best", min)):
        for name, runs in results.items():
            print(f"{label:>6} {name:>10}: pack {pick(r[0] for r in runs):.3f} ms + fill "
                  f"{pick(r[1] for r in runs):.3f} ms, total {pick(r[0] + r[1] for r in runs):.3f}"
                  f" ms a window ({runs[0][2]} windows timed, {args.rounds} rounds)")
    ratios = [[b[k] / a[k] for b, a in zip(before, after, strict=True)] for k in (0, 1)]
    totals = [(b[0] + b[1]) / (a[0] + a[1]) for b, a in zip(before, after, strict=True)]
    print(f"median of the rounds' ratios: pack {statistics.median(ratios[0]):.2f}x, fill "
          f"{statistics.median(ratios[1]):.2f}x, total {statistics.median(totals):.2f}x")


if __name__ == "__main__":
    main()

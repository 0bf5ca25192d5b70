"""BTT-MoE: compute only the selected experts, or all experts then mask? Measured, not assumed.

For each width ``d`` (square layer) and row count ``N``, times one forward + backward of
``BTTMoELinear(d, d, experts=E, top_k=k)`` with ``compute="selected"`` (rows grouped by expert,
``k/E`` of the expert MACs, a gather and a per-expert loop) and ``compute="all"`` (a rank-``E``
BTT with gated intermediate, fixed shapes), with a trained-looking random router so that the
experts are used about evenly. Prints a table (minimum of ``--repeat`` alternated runs, in
milliseconds) and the ratio all/selected (> 1: selected is faster); ``--json`` writes the rows.

    .venv/bin/python benchmarks/moe_routing.py --widths 256 512 1024 --rows 64 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from structlin.aux import clear_aux
from structlin.layers.btt_moe import BTTMoELinear


def _step(layer: BTTMoELinear, x: torch.Tensor, mode: str) -> float:
    layer.compute = mode
    start = time.perf_counter()
    layer(x).sum().backward()
    elapsed = time.perf_counter() - start
    layer.zero_grad(set_to_none=True)
    clear_aux(layer)
    return elapsed


def _time(layer: BTTMoELinear, x: torch.Tensor, repeat: int) -> dict[str, float]:
    """Minimum over ``repeat`` runs of each mode, the two modes alternated (so that a slow spell
    of a shared machine hits both), after two warm-up runs each."""
    modes = ("selected", "all")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(repeat + 2):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            elapsed = _step(layer, x, mode)
            if i >= 2:
                times[mode].append(elapsed)
    return {f"{m}_ms": 1e3 * min(t) for m, t in times.items()}


def run(widths: list[int], rows: list[int], experts: int, top_k: int, repeat: int) -> list[dict]:
    out = []
    for d in widths:
        torch.manual_seed(0)
        layer = BTTMoELinear(d, d, bias=False, experts=experts, top_k=top_k)
        with torch.no_grad():
            layer.router.normal_(0.0, d**-0.5)
        for n in rows:
            x = torch.randn(n, d, requires_grad=True)
            row = {"d": d, "rows": n, "experts": experts, "top_k": top_k}
            row.update(_time(layer, x, repeat))
            row["all_over_selected"] = row["all_ms"] / row["selected_ms"]
            out.append(row)
            print(
                f"d={d:5d} N={n:5d}  selected {row['selected_ms']:8.2f} ms  all "
                f"{row['all_ms']:8.2f} ms  all/selected {row['all_over_selected']:5.2f}",
                flush=True,
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = run(args.widths, args.rows, args.experts, args.top_k, args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Render benchmark JSON files (from `structlin bench --out ...`) as Markdown tables."""

import argparse
import json
from pathlib import Path


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    m = data["machine"]
    lines = [
        f"`{path.name}`: {m.get('processor')}, {m.get('threads')} threads, torch {m.get('torch')}, "
        f"{m.get('dtype')} on {m.get('device')}, malloc tuned: {m.get('malloc_tuned')}"
        + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        "",
        "| structure | batch | d | time ms | GFLOP/s | FLOP ratio | time ratio | efficiency "
        "| vs naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        vs = f"{r['speedup_vs_naive']:.2f}x" if r.get("speedup_vs_naive") else ""
        lines.append(
            f"| {r['structure']} | {r['batch']} | {r['d']} | {r['time_ms']:.2f} | "
            f"{r['gflops']:.1f} | {r['flop_ratio']:.1f} | {r['time_ratio']:.2f} | "
            f"{r['efficiency']:.2f} | {vs} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    for f in parser.parse_args().files:
        print(render(f))
        print()

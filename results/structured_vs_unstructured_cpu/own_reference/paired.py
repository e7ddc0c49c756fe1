"""Paired by seed: the current grid's online cells (keypoints.reference: other) minus the same seeds' cells kept in
a folder beside them: by default this one (made with the paper's reference frame), or another folder's cells/
(e.g. ../cnn_prefix_resume_bug). Prints a Markdown table and writes paired.json into that folder.

    python results/structured_vs_unstructured_cpu/own_reference/paired.py [FOLDER]
"""
import sys
from pathlib import Path

import numpy as np

from kp_rl.experiment import bootstrap_ci
from kp_rl.files import read_json, write_json

HERE = Path(__file__).resolve().parent
KEPT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE


def final(path: Path) -> float:
    return float(read_json(path)["returns"][-1])


rows = []
for own in sorted((KEPT / "cells").glob("*/*/seed*.json")):
    task, agent, seed = own.parts[-3], own.parts[-2], own.stem
    other = HERE.parent / "cells" / task / agent / own.name
    if other.is_file() and read_json(other).get("done"):
        rows.append((task, agent, int(seed[4:]), final(own), final(other)))
table, out = [f"| task | agent | seeds | {KEPT.name} | current grid | current - {KEPT.name} [95% CI] |", "|---|---|---|---|---|---|"], {}
for task, agent in sorted({(r[0], r[1]) for r in rows}):
    pairs = [r for r in rows if r[:2] == (task, agent)]
    own, other = np.array([r[3] for r in pairs]), np.array([r[4] for r in pairs])
    diff = other - own
    low, high = bootstrap_ci([diff]) if len(diff) > 1 else (float("nan"), float("nan"))
    out[f"{task}/{agent}"] = {"seeds": [r[2] for r in pairs], "own": own.tolist(), "other": other.tolist(),
                              "diff_mean": float(diff.mean()), "diff_ci": [low, high]}
    table.append(f"| {task} | {agent} | {', '.join(str(r[2]) for r in pairs)} | {' / '.join(f'{v:.0f}' for v in own)} | "
                 f"{' / '.join(f'{v:.0f}' for v in other)} | {diff.mean():+.0f} [{low:+.0f}, {high:+.0f}] |")
write_json(KEPT / "paired.json", out)
print("\n".join(table))

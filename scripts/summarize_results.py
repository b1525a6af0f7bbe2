"""Prints a Markdown table of every summary.json under a folder (one row per results folder)."""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "results")
print("| results | task | n | metric | score % | 95% CI | wall s |")
print("|---|---|---|---|---|---|---|")
for path in sorted(root.glob("**/summary.json")):
    s = json.loads(path.read_text())
    for name, m in s["metrics"].items():
        print(
            f"| {path.parent.name} | {s['task']} | {s['n']} | {name} | {100 * m['mean']:.1f} "
            f"| {100 * m['ci_low']:.1f}-{100 * m['ci_high']:.1f} | {s['timing']['seconds']:.0f} |"
        )

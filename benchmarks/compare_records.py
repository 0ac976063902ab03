"""Same results before and after a change: run a fixed small evaluation, then compare two runs exactly.

    python benchmarks/compare_records.py run  DIR     # writes DIR/attack/records.csv and DIR/gamma/gamma.csv
    python benchmarks/compare_records.py diff DIR_A DIR_B

``run`` is the fixed workload of issue 9: ``robusteval attack -m zoo:fmnist-adv2 -a untargeted
-a multi-targeted -a fgsm-20 --n 200 --restarts 2 --steps 40`` and ``robusteval gamma`` on two zoo
models (first 200 test images). ``diff`` compares every per-example value exactly (floats bit for bit,
as text), except wall-time columns and the configuration text (its spelling may change; shown when it
does); columns renamed between versions are mapped (γ's ``id``/``pred``
became ``example_id``/``clean_pred``), and a column present on one side only is listed, not compared.
Exit status 0 when identical, 1 otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ATTACK = ["attack", "-m", "zoo:fmnist-adv2", "-a", "untargeted", "-a", "multi-targeted", "-a", "fgsm-20",
          "--n", "200", "--restarts", "2", "--steps", "40", "--eps", "0.1", "--device", "cpu", "-q"]
GAMMA = ["gamma", "-m", "zoo:fmnist-adv2", "-m", "zoo:fmnist-llr2", "--n", "200", "--eps", "0.1",
         "--device", "cpu"]
TIMING = {"seconds"}
#: Descriptions of the run, not results: a change of their spelling is reported, not counted as a difference.
DESCRIPTIONS = {"attack_config"}
RENAMED = {"id": "example_id", "pred": "clean_pred"}
KEYS = {"records.csv": ["model", "attack", "eps", "example_id"], "gamma.csv": ["model", "example_id"]}


def run(out: Path) -> None:
    for args, sub in ((ATTACK, "attack"), (GAMMA, "gamma")):
        cmd = [sys.executable, "-m", "robusteval", *args, "--out", str(out / sub)]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _load(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False).rename(columns=RENAMED)
    return df.sort_values(KEYS[path.name], kind="stable").reset_index(drop=True)


def diff(a: Path, b: Path) -> int:
    bad = 0
    for rel in ("attack/records.csv", "gamma/gamma.csv"):
        x, y = _load(a / rel), _load(b / rel)
        only = sorted(set(x.columns) ^ set(y.columns))
        common = [c for c in x.columns if c in y.columns and c not in TIMING | DESCRIPTIONS]
        for c in sorted(DESCRIPTIONS & set(x.columns) & set(y.columns)):
            if not x[c].equals(y[c]):
                print(f"{rel}: the text of {c} changed (a description, not a result), e.g.\n"
                      f"  before: {x[c].iloc[0]}\n  after:  {y[c].iloc[0]}")
        if len(x) != len(y):
            print(f"{rel}: {len(x)} rows vs {len(y)}")
            bad += 1
            continue
        differ = [c for c in common if not x[c].equals(y[c])]
        print(f"{rel}: {len(x)} rows, {len(common)} columns compared exactly"
              + (f"; only on one side: {', '.join(only)}" if only else "")
              + (f"; DIFFERENT: {', '.join(differ)}" if differ else "; identical"))
        bad += bool(differ)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "diff":
        sys.exit(diff(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)

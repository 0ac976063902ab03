"""Same results before and after a change: run a fixed set of evaluations, then compare two runs exactly.

    python benchmarks/compare_records.py run  DIR     # every workload below into DIR/<name>/
    python benchmarks/compare_records.py diff DIR_A DIR_B

The workloads (CPU, a few minutes on 2 cores):

* ``standard`` — the default battery with the masking checks on two zoo models (first 100 images);
* ``paper`` — the paper battery (reduced to 2 restarts × 40 steps) with the checks on the same two models;
* ``gamma`` — γ(ε, x) of two zoo models (first 100 images);
* ``shard`` — the standard battery split with ``--shard 0/2`` and ``--shard 1/2`` (first 50 images);
* ``torchrun`` — the paper battery (reduced) under ``torchrun --nproc-per-node 2`` (first 50 images).

``diff`` compares every per-example value exactly (floats bit for bit, as text), except wall-time
columns and the configuration text (its spelling may change; shown when it does); shard files are
compared one by one, and so are the alarms that fired (model, alarm, detail). A column present on one
side only is listed, not compared; a renamed column (``linf`` became ``distance``) is compared under
its new name. Exit status 0 when identical, 1 otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

MODELS = ["-m", "zoo:fmnist-adv2", "-m", "zoo:fmnist-llr2"]
REDUCED = ["--restarts", "2", "--steps", "40"]
COMMON = ["--eps", "0.1", "--device", "cpu", "-q", "--allow-unreliable"]
WORKLOADS: dict[str, list[list[str]]] = {
    "standard": [["attack", *MODELS, "-n", "100", *COMMON]],
    "paper": [["attack", *MODELS, "-a", "paper", *REDUCED, "-n", "100", *COMMON]],
    "gamma": [["gamma", *MODELS, "-n", "100", "--eps", "0.1", "--device", "cpu"]],
    "shard": [["attack", "-m", "zoo:fmnist-adv2", "-n", "50", "--shard", f"{i}/2", *COMMON]
              for i in range(2)],
    "torchrun": [["torchrun", "-m", "zoo:fmnist-adv2", "-a", "paper", *REDUCED, "-n", "50", *COMMON]],
}
TIMING = {"seconds"}
#: Descriptions of the run, not results: a change of their spelling is reported, not counted as a difference.
DESCRIPTIONS = {"attack_config"}
KEYS = {"records": ["model", "attack", "eps", "example_id"], "gamma": ["model", "example_id"],
        "alarms": ["model", "alarm", "detail"]}


def _command(args: list[str], out: Path) -> list[str]:
    if args[0] == "torchrun":
        runner = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        return [runner, "--nproc-per-node", "2", "--standalone", "-m", "robusteval", "attack", *args[1:],
                "--out", str(out)]
    return [sys.executable, "-m", "robusteval", *args, "--out", str(out)]


def run(out: Path, only: list[str] | None = None) -> None:
    for name, commands in WORKLOADS.items():
        if only and name not in only:
            continue
        for args in commands:
            cmd = _command(args, out / name)
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _kind(path: Path) -> str:
    return path.name.split(".")[0]


#: Columns renamed between versions: compared under their new name.
RENAMED = {"linf": "distance"}


def _load(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False).rename(columns=RENAMED)
    kind = _kind(path)
    if kind == "alarms":  # only the alarms that fired (once per model, alarm and detail: a version may
        # store an ε-independent alarm once or at every ε), whatever else a version stores beside them
        df = df.rename(columns={"check": "alarm"})
        if "status" in df.columns:
            df = df[df["status"] == "raised"]
        df = df[["model", "alarm", "detail"]].drop_duplicates()
    return df.sort_values(KEYS[kind], kind="stable").reset_index(drop=True)


def _files(run_dir: Path) -> list[str]:
    names = [p.name for p in run_dir.glob("*.csv")]
    return sorted(n for n in names if _kind(Path(n)) in KEYS)


def diff(a: Path, b: Path) -> int:
    bad = 0
    for name in WORKLOADS:
        if not (a / name).is_dir() or not (b / name).is_dir():
            print(f"{name}: missing on one side")
            bad += 1
            continue
        files = sorted(set(_files(a / name)) | set(_files(b / name)))
        for rel in files:
            pa, pb = a / name / rel, b / name / rel
            if not pa.is_file() or not pb.is_file():
                print(f"{name}/{rel}: only on one side")
                bad += 1
                continue
            x, y = _load(pa), _load(pb)
            only = sorted(set(x.columns) ^ set(y.columns))
            common = [c for c in x.columns if c in y.columns and c not in TIMING | DESCRIPTIONS]
            for c in sorted(DESCRIPTIONS & set(x.columns) & set(y.columns)):
                if not x[c].equals(y[c]):
                    print(f"{name}/{rel}: the text of {c} changed (a description, not a result), e.g.\n"
                          f"  before: {x[c].iloc[0]}\n  after:  {y[c].iloc[0]}")
            if len(x) != len(y):
                print(f"{name}/{rel}: {len(x)} rows vs {len(y)}")
                bad += 1
                continue
            differ = [c for c in common if not x[c].equals(y[c])]
            print(f"{name}/{rel}: {len(x)} rows, {len(common)} columns compared exactly"
                  + (f"; only on one side: {', '.join(only)}" if only else "")
                  + (f"; DIFFERENT: {', '.join(differ)}" if differ else "; identical"))
            bad += bool(differ)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]), sys.argv[3:] or None)
    elif len(sys.argv) == 4 and sys.argv[1] == "diff":
        sys.exit(diff(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)

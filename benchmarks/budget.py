"""A budget kept: the wall time of a whole ``finetune fit --time-budget`` (auto) against its
budget, on an idle machine and with busy processes taking CPU from it, side by side.

    python benchmarks/budget.py [--dataset digit-parity] [--budget 1.5] [--busy 2]

Each run is the real command in a fresh process, timed from start to exit (scan, auto's
measurements, the probe baseline, training, TTA scoring and the report included). The busy
runs start ``--busy`` processes that spin on the CPU from before the fit starts to after it
ends: auto plans the fine-tune while they run, and they slow the epochs as another job on a
shared machine would. The table shows the time over the budget, the epochs auto planned and
ran, and what the trainer said about the budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdata import build  # benchmarks/benchdata.py

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def fit(data: Path, out: Path, budget: float, busy: int, start_busy_after: float) -> dict:
    """One timed ``finetune fit``; ``busy`` spinning processes started ``start_busy_after``
    seconds into it (0: before it)."""
    exe = Path(sys.executable).with_name("finetune")
    command = [str(exe), "fit", str(data), "--time-budget", str(budget), "--out", str(out)]
    spinners: list[subprocess.Popen] = []
    started = time.perf_counter()
    if start_busy_after == 0:
        spinners = _spin(busy, budget)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if start_busy_after > 0:
        time.sleep(start_busy_after)
        spinners = _spin(busy, budget)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    for spinner in spinners:
        spinner.kill()
    if process.returncode != 0:
        raise SystemExit(f"fit failed:\n{stderr[-3000:]}")
    decision = json.loads((out / "decision.json").read_text())
    metrics = (out / "metrics.csv").read_text().splitlines()[1:]
    said = [line.strip() for line in stderr.splitlines() if "budget" in line and "auto" not in line]
    return {
        "seconds": seconds,
        "strategy": decision["strategy"],
        "planned": decision["settings"].get("epochs"),
        "ran": len(metrics),
        "said": said[-1] if said else "",
        "stdout": stdout,
    }


def _spin(count: int, budget_minutes: float) -> list[subprocess.Popen]:
    code = SPIN.format(seconds=budget_minutes * 60 * 3)
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digit-parity")
    parser.add_argument("--budget", type=float, default=1.5, help="minutes")
    parser.add_argument("--busy", type=int, default=2, help="spinning processes")
    args = parser.parse_args()
    data = build(Path(__file__).parent / "data")[args.dataset]
    budget = args.budget * 60
    print(f"{args.dataset}, --time-budget {args.budget:g} min ({budget:.0f} s)")
    header = f"{'machine':<34}{'wall s':>8}{'/ budget':>10}{'planned':>9}{'ran':>5}  said"
    print(header)
    cases = (
        ("idle", 0, 0.0),
        (f"{args.busy} busy from the start", args.busy, 0.0),
        (f"{args.busy} busy from 30 s in (after planning)", args.busy, 30.0),
    )
    for name, busy, after in cases:
        with tempfile.TemporaryDirectory() as tmp:
            row = fit(data, Path(tmp) / "run", args.budget, busy, after)
        print(
            f"{name:<34}{row['seconds']:>8.0f}{row['seconds'] / budget:>10.2f}"
            f"{row['planned'] or '-':>9}{row['ran']:>5}  {row['strategy']}; {row['said']}",
            flush=True,
        )


if __name__ == "__main__":
    main()

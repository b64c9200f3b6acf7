"""Several training processes side by side: OpenMP threads that spin while they wait, or sleep.

The test suite starts fits and CLI commands several at a time (run_many, the cli_runs fixture,
torchrun's ranks) on CI's two cores. Each process's PyTorch runs one OpenMP thread per core, and
GNU OpenMP's threads spin for a while before they sleep when they wait for work: with more
threads than cores, the spinning threads take the cores the working ones need. This measures
the default against ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) and a short spin
(``GOMP_SPINCOUNT=10000``), which tests/conftest.py sets for the suite and every process it
starts.

Each configuration starts ``--processes`` Python processes at once, each timing ``--steps``
training steps of tf_efficientnet_lite0 (random weights, batch 8 at 32 px, channels_last,
AdamW; in fp32 and under bf16 autocast), the size of the suite's fits. Reported: the median
over processes of CPU seconds and wall seconds per step, and the wall time of the whole group.
Alone (one process) is the baseline: a setting must not make a single fit on idle cores slower.

    python benchmarks/omp_wait.py [--processes 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

STEP = """
import json, time, torch, timm
torch.manual_seed(0)
model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
opt = torch.optim.AdamW(model.parameters())
import os
x = x.contiguous(memory_format=torch.channels_last)
model = model.to(memory_format=torch.channels_last)
bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(os.environ["BENCH_BF16"]))
def step():
    with bf16:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
step()  # warm-up
cpu, wall = time.process_time(), time.perf_counter()
for _ in range({steps}):
    step()
print(json.dumps({{"cpu": (time.process_time() - cpu) / {steps},
                  "wall": (time.perf_counter() - wall) / {steps}}}))
"""


# name -> the environment it sets. GNU OpenMP spins GOMP_SPINCOUNT times before it sleeps
# (300,000 by default; 1,000 when it sees more threads than cores; PASSIVE: 0).
SETTINGS = {
    "(default)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
}


def group(processes: int, steps: int, setting: dict[str, str], bf16: bool) -> dict[str, float]:
    """Start ``processes`` timers at once; their median per-step CPU and wall seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(setting)
    env["BENCH_BF16"] = "1" if bf16 else ""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STEP.format(steps=steps)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = [json.loads(p.communicate()[0]) for p in procs]
    return {
        "cpu": statistics.median(r["cpu"] for r in results),
        "wall": statistics.median(r["wall"] for r in results),
        "group": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.steps} steps per process, batch 8 at 32 px")
    print(f"{'processes':>9}  {'precision':<9}  {'setting':<23}  {'cpu s/step':>10}  "
          f"{'wall s/step':>11}  {'group wall s':>12}")  # fmt: skip
    for processes in (1, args.processes):
        for bf16 in (False, True):
            for name, setting in SETTINGS.items():  # side by side, default first
                r = group(processes, args.steps, setting, bf16)
                print(f"{processes:>9}  {'bf16' if bf16 else 'fp32':<9}  {name:<23}  "
                      f"{r['cpu']:>10.3f}  {r['wall']:>11.3f}  {r['group']:>12.1f}")  # fmt: skip


if __name__ == "__main__":
    main()

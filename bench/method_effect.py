"""Does multiagent finetuning do anything on the bundled model? The default job's kind of task at a size where a
standard error is small (arithmetic:medium, since easy has too few problems): by default 200 training and 200
held-out problems, 3 agents x 2 rounds, 3 iterations, with the STaR and
single-agent-FT baselines (single agent, majority vote and debate come out of every evaluation debate).

It runs the real CLI (`orchestrator run ... --baselines star,single-ft`, then `orchestrator report`) in a folder
of its own, so it is resumable like any run: start it again with the same arguments and it continues. It prints
the wall time and, as Markdown for the README, accuracy ± standard error per society, method and iteration (the
layout of the paper's Table 1 and its iteration plot), with n and the unanswered count.

    python bench/method_effect.py                               # ~1 hour on a 2-core CPU machine (see README)
    python bench/method_effect.py --train 24 --eval 24 --iterations 1 --baselines ""   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = {"single": "single agent", "majority": "majority vote", "debate": "debate"}
SOCIETIES = {"maft": "multiagent FT", "star": "STaR", "single-ft": "single-agent FT", "majority-ft": "majority FT",
             "no-summary": "MAFT, no summary", "no-critic": "MAFT, no critic"}


def orchestrator(*args: str, folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "160",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args, "--db", str(folder / "maft.db")],
                          cwd=folder, env=env, text=True, capture_output=True)


def cell(e: dict[str, Any]) -> str:
    return f"{100 * e['accuracy']:.1f} ± {100 * e['stderr']:.1f}"


def table(evaluations: list[dict[str, Any]], iterations: int) -> str:
    """Rows: base methods, then each finetuned society's methods; columns: iteration 0..L (0 = base)."""
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for e in evaluations:
        by[(e["society"], e["method"])][e["iteration"]] = e
    head = "| society | method | " + " | ".join(f"iteration {i}" for i in range(iterations + 1)) + " |"
    lines = [head, "|" + "---|" * (iterations + 3)]
    societies = ["base", *[s for s in SOCIETIES if any(k[0] == s for k in by)]]
    for society in societies:
        for method, label in METHODS.items():
            row = by.get((society, method))
            if not row:
                continue
            cells = [cell(row[i]) if i in row else "" for i in range(iterations + 1)]
            if society == "base":
                cells = [cell(row[0])] + [""] * iterations
            lines.append(f"| {SOCIETIES.get(society, society)} | {label} | " + " | ".join(cells) + " |")
    n = {e["n"] for e in evaluations}
    lines.append(f"\nn = {', '.join(map(str, sorted(n)))} held-out problems per cell; accuracy in %, ± one "
                 "standard error.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=REPO / "maft-bench" / "method-effect",
                        help="Where the run's database, files and report live (reused: the run resumes).")
    # the default job's arithmetic:easy has only 441 distinct problems (92 held out): too few for 200 + 200, so
    # its sibling with the same demo settings, a+b*c over 0-10 (1,331 problems)
    parser.add_argument("--task", default="arithmetic:medium")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--baselines", default="star,single-ft")
    parser.add_argument("--name", default="method-effect")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="[local] dtype of generation (bfloat16: faster where the CPU has it; see README)")
    args = parser.parse_args()

    args.folder.mkdir(parents=True, exist_ok=True)
    config = args.folder / "bench.toml"
    config.write_text(f'[local]\ndtype = "{args.dtype}"\n', encoding="utf-8")
    command = ["run", "--task", args.task, "--train-size", str(args.train), "--eval-size", str(args.eval),
               "--iterations", str(args.iterations), "--name", args.name, "--quiet", "--config", str(config)]
    if args.baselines:
        command += ["--baselines", args.baselines]
    started = time.monotonic()
    proc = orchestrator(*command, folder=args.folder)
    seconds = time.monotonic() - started
    # a resumed run's wall time is the sum of its invocations'
    ledger = args.folder / "wall-seconds.txt"
    total = seconds + (float(ledger.read_text()) if ledger.exists() else 0.0)
    ledger.write_text(f"{total:.1f}\n")
    if proc.returncode != 0:
        sys.exit(f"the run stopped (exit {proc.returncode}); run this again to resume it\n{proc.stderr[-2000:]}")
    orchestrator("report", args.name, folder=args.folder)
    data = json.loads(orchestrator("report", args.name, "--json", folder=args.folder).stdout)
    print(f"# method effect · {args.task} · {args.train} train / {args.eval} held-out · 3 agents × 2 rounds · "
          f"{args.iterations} iterations · baselines {args.baselines or 'none'}")
    print(f"{time.strftime('%Y-%m-%d')} · {platform.node()} · {os.cpu_count()} CPUs · load "
          f"{os.getloadavg()[0]:.1f} · dtype {args.dtype} · wall time {total / 60:.1f} min (all invocations; "
          f"{seconds / 60:.1f} this one)\n")
    print(table(data["evaluations"], args.iterations))
    print(f"\nreport: {args.folder / 'maft-reports' / (args.name + '.html')}")


if __name__ == "__main__":
    main()

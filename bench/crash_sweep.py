"""Kill a run with SIGKILL at every crash point, at several of its hits, resume it, and compare with a calm run.

`tests/test_crash.py` checks a chosen dozen places on every test run; this sweep checks them all. For each backend
(openai against the fake OpenAI server, its batch mode, and local with the tiny model of the tests) it first runs
the job once with `MAFT_CRASH_TRACE`, which records every crash point passed and how often: that run is the
reference. Then, for every point and k in {1, the middle hit, the last hit} (or `--hits`), it runs the job with
`MAFT_CRASH_AT=POINT#k`, runs the same command again to resume it, and prints one row:

    backend  point  k  died  resumed  identical  dup jobs  dup uploads  dup chats  integrity  seconds

- died: the first process was killed by SIGKILL (exit -9) at that point;
- resumed: the second one finished (exit 0);
- identical: evaluations, datasets (sha256), models, responses word for word, jobs and ledger lines all equal
  the reference's (`Snapshot.differences` of the tests);
- dup jobs / dup uploads: jobs and training uploads on the server beyond the reference's (must be 0);
- dup chats: chat answers the server produced for a request it had already answered: paid work lost with the
  process (at most the requests in flight, `[openai] concurrency`, when it died inside a debate; else 0);
- integrity: `PRAGMA integrity_check` of the store after the resume.

    python bench/crash_sweep.py                      # everything, within --budget seconds (default 600)
    python bench/crash_sweep.py --backends openai --hits 1,last
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not installed: import it from the checkout

from tests import test_crash as harness  # noqa: E402  (after the path is set)
from tests.test_crash import Scenario  # noqa: E402

BACKENDS = ("openai", "batch", "local")


@dataclass(frozen=True)
class Row:
    backend: str
    point: str
    k: int
    died: bool
    resumed: bool
    identical: bool
    dup_jobs: int
    dup_uploads: int
    dup_chats: int
    integrity: str
    seconds: float
    why: str = ""

    @property
    def ok(self) -> bool:
        return (self.died and self.resumed and self.identical and self.dup_jobs == 0 and self.dup_uploads == 0
                and self.integrity == "ok")


def traced(run: Callable[..., Scenario], workdir: Path) -> tuple[Scenario, collections.Counter[str]]:
    """The reference run, recording every crash point it passes."""
    trace = workdir / "trace.txt"
    original = harness.cli
    harness.cli = lambda *a, **kw: original(*a, **{**kw, "trace": trace})  # type: ignore[assignment]
    try:
        reference = run(workdir / "run")
    finally:
        harness.cli = original
    return reference, collections.Counter(trace.read_text(encoding="utf-8").split())


def hits_to_try(total: int, wanted: Iterable[str]) -> list[int]:
    """k values for a point hit `total` times: "1", "mid", "last", or numbers."""
    chosen = []
    for w in wanted:
        k = {"first": 1, "mid": math.ceil(total / 2), "last": total}.get(w) or int(w)
        if 1 <= k <= total and k not in chosen:
            chosen.append(k)
    return chosen


def crashed_row(backend: str, point: str, k: int, reference: Scenario, run: Callable[..., Scenario],
                workdir: Path, deadline: float) -> Row | None:
    """One kill-and-resume, as a row (None once past the deadline); a failure to die or to resume is a row too,
    never an exception."""
    started = time.monotonic()
    if started > deadline:
        return None
    try:
        scenario = run(workdir, f"{point}#{k}")
    except AssertionError as exc:  # did not die, or did not resume
        text = str(exc)
        died = "did not kill" not in text
        return Row(backend, point, k, died, False, False, 0, 0, 0, "?", time.monotonic() - started,
                   text.splitlines()[0][:200])
    problems = scenario.snapshot.differences(reference.snapshot)
    ref, got = reference.server, scenario.server
    return Row(backend, point, k, True, True, not problems, got.jobs - ref.jobs, got.uploads - ref.uploads,
               got.repeated_chats - ref.repeated_chats, scenario.snapshot.integrity, time.monotonic() - started,
               "; ".join(problems)[:300])


def plans(backend: str, model: Path | None) -> Callable[..., Scenario]:
    """How to run the job of a backend: (workdir, crash_at=None) -> Scenario."""
    if backend == "openai":
        return harness.openai_scenario
    if backend == "batch":
        return lambda workdir, crash_at=None: harness.openai_scenario(workdir, crash_at, **copy.deepcopy(harness.BATCH))
    assert model is not None
    return lambda workdir, crash_at=None: harness.local_scenario(workdir, model, crash_at)


def sweep(backends: list[str], wanted: list[str], budget: float, workers: int, root: Path,
          only: set[str] | None) -> list[Row]:
    deadline = time.monotonic() + budget
    rows: list[Row] = []
    model = harness.build_answering_model(root / "tiny") if "local" in backends else None
    for backend in backends:
        run = plans(backend, model)
        reference, counts = traced(run, root / backend / "reference")
        print(f"# {backend}: reference in {reference.seconds:.1f} s; points hit: "
              + ", ".join(f"{p} x{n}" for p, n in sorted(counts.items())), flush=True)
        cases = [(point, k) for point, total in sorted(counts.items()) if only is None or point in only
                 for k in hits_to_try(total, wanted)]
        if backend == "batch":  # its own point, and a debate delivering a finished batch (the rest is openai's)
            cases = [(p, k) for p, k in cases if p in ("batch.created", "debate.train-1.stored")]
        # local runs use every core for torch: one at a time; hosted runs mostly wait: two at once
        with ThreadPoolExecutor(max_workers=1 if backend == "local" else workers) as pool:
            futures = [pool.submit(crashed_row, backend, point, k, reference, run, root / backend / f"{i:03d}",
                                   deadline) for i, (point, k) in enumerate(cases)]
            for future in futures:
                row = future.result()
                if row is None:
                    continue
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(row: Row) -> str:
    mark = "yes" if row.identical else "NO"
    return (f"| {row.backend} | `{row.point}` | {row.k} | {'yes' if row.died else 'NO'} | "
            f"{'yes' if row.resumed else 'NO'} | {mark} | {row.dup_jobs} | {row.dup_uploads} | {row.dup_chats} | "
            f"{row.integrity} | {row.seconds:.1f} |" + (f" {row.why}" if row.why else ""))


HEADER = ("| backend | point | k | died | resumed | identical | dup jobs | dup uploads | dup chats | integrity | s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def machine() -> str:
    import torch

    cores = os.cpu_count()
    return (f"{platform.machine()} {platform.processor() or ''} {cores} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)").replace("  ", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: openai, batch, local")
    parser.add_argument("--hits", default="first,mid,last", help="which hits of each point: first, mid, last, or k")
    parser.add_argument("--points", help="comma-separated point names (default: every point the run passes)")
    parser.add_argument("--budget", type=float, default=600, help="seconds; later cases are skipped")
    parser.add_argument("--workers", type=int, default=2, help="hosted cases run at once")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maft-crash-sweep-") as folder:
        rows = sweep(args.backends.split(","), args.hits.split(","), args.budget, args.workers, Path(folder),
                     set(args.points.split(",")) if args.points else None)
    bad = [r for r in rows if not r.ok]
    summary = (f"{len(rows)} kills, {len(rows) - len(bad)} ended exactly like the reference, {len(bad)} did not; "
               f"{time.monotonic() - started:.0f} s on {machine()}, "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    print()
    print(summary)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Wall time of an iteration's 2N finetunes as Ray tasks on K workers, against the sum and the max of single jobs.

Each of the 2N jobs first runs alone on the cluster (one at a time, so each has its CPUs and GPU to itself): their
sum is what the in-process path costs, their max what perfect parallelism could reach. Then all 2N are submitted at
once, as the pipeline submits an iteration's jobs, and the wall time from submitting to the last job's end is
timed. Targets: wall <= 1.25 x (sum / K) + startup, and wall ~ the slowest job when K >= 2N. Startup is the time
from submitting to the first job's "started" on a worker (the task scheduled, the model loaded there).

The jobs are GSM8K training questions with the task's round-1 prompt, each answered with its official worked
solution, a different slice per job; LoRA r=8 on q/k/v/o as a run trains.

    python bench/cluster_finetune.py                      # bundled SmolLM2-135M-Instruct, 6 jobs, K = CPUs / 1
    python bench/cluster_finetune.py --workers 2 --cpus-per-job 4 --gpus-per-job 0
    python bench/cluster_finetune.py --address auto       # the cluster `ray start --head` made
    python bench/cluster_finetune.py --smoke              # a tiny random model, 4 jobs (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prompts
from backends.base import TERMINAL_STATUSES, FinetuneSpec, TrainingParams
from backends.cluster_settings import ClusterConfig
from backends.local_cluster import RayLocalBackend, import_ray
from backends.local_model import DEFAULT_MODEL
from bench.local_generation import load_average
from orchestrator.tasks import get_task


def write_jobs(folder: Path, jobs: int, examples: int, params: TrainingParams) -> list[FinetuneSpec]:
    """One file of `examples` GSM8K problems per job, no two jobs on the same problems (as agents' sets differ)."""
    problems = get_task("gsm8k").train_problems(jobs * examples, 0)
    specs = []
    for job in range(jobs):
        lines = []
        for problem in problems[job * examples:(job + 1) * examples]:
            question = prompts.render("gsm8k/round1.txt", question=problem.question)
            answer = str(problem.meta["solution"]).replace("####", "The answer is")
            lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}))
        data = folder / f"job-{job}.jsonl"
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        specs.append(FinetuneSpec(key=f"bench/agent-{job // 2 + 1}/{('generator', 'critic')[job % 2]}",
                                  base_model="base", training_file=data, suffix="b", params=params, seed=job))
    return specs


def run(backend: RayLocalBackend, specs: list[FinetuneSpec], prefix: str) -> tuple[float, list[dict]]:
    """Submit `specs` at once under keys starting `prefix`; the wall time to the last job's end and the records."""
    keyed = [s.model_copy(update={"key": f"{prefix}/{s.key}"}) for s in specs]
    started = time.time()
    refs = [backend.start_finetune(s) for s in keyed]
    while True:
        states = [backend.poll(r) for r in refs]
        if all(s.status in TERMINAL_STATUSES for s in states):
            break
        time.sleep(0.05)
    wall = time.time() - started
    failed = [(r.key, s.error) for r, s in zip(refs, states, strict=True) if s.status != "succeeded"]
    if failed:
        raise SystemExit(f"jobs failed: {failed}")
    records = [json.loads((backend.adapter_path(r.key) / "job.json").read_text(encoding="utf-8")) for r in refs]
    for record in records:
        record["submitted_at"] = started
    return wall, records


def first_started(record: dict) -> float:
    return min(e["created_at"] for e in record["events"] if e["message"] == "started")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--jobs", type=int, default=6, help="2N: the jobs of one iteration")
    parser.add_argument("--workers", type=int, default=None, help="K (address local): default CPUs / cpus-per-job")
    parser.add_argument("--cpus-per-job", type=int, default=1)
    parser.add_argument("--gpus-per-job", default="auto")
    parser.add_argument("--examples", type=int, default=16, help="per job")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--address", default="local")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    ray = import_ray()

    with tempfile.TemporaryDirectory(prefix="maft-cluster-bench-") as tmp:
        folder = Path(tmp)
        model = args.model
        if args.smoke:
            from tests.tiny_model import build_tiny_model

            model, args.jobs, args.examples = str(build_tiny_model(folder / "tiny")), 4, 8
        gpus = args.gpus_per_job if args.gpus_per_job == "auto" else float(args.gpus_per_job)
        cpus = os.cpu_count() or 1
        workers = args.workers or max(1, cpus // args.cpus_per_job)
        if args.address == "local":  # K workers' worth of CPUs (and GPUs, logical when the machine has none)
            config = ClusterConfig(address="local", cpus_per_job=args.cpus_per_job, gpus_per_job=gpus,
                                   num_cpus=workers * args.cpus_per_job)
        else:
            config = ClusterConfig(address=args.address, cpus_per_job=args.cpus_per_job, gpus_per_job=gpus)
        backend = RayLocalBackend(model, workdir=folder / "work", device=args.device, show_progress=False)
        backend.attach(config)
        params = TrainingParams(epochs=args.epochs, batch_size=8, learning_rate=1e-4, lora_rank=8, max_length=2048)
        specs = write_jobs(folder, args.jobs, args.examples, params)
        try:
            connect = time.time()
            backend.check_server(finetuning=True)
            connect = time.time() - connect
            resources = ray.cluster_resources()
            if args.address != "local":
                per_job = {"CPU": args.cpus_per_job, "GPU": backend._gpus()}
                workers = int(min(resources.get(k, 0) // v for k, v in per_job.items() if v > 0))
            print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load_average()}, "
                  f"{cpus} CPUs here; model {Path(model).name}; {args.jobs} jobs x {args.examples} examples x "
                  f"{args.epochs} epoch(s); K = {workers} workers ({args.cpus_per_job} CPU, {backend._gpus():g} GPU "
                  f"per job); cluster {args.address}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} "
                  f"GPUs, reached in {connect:.1f} s")
            run(backend, specs[:min(workers, len(specs))], "warm")  # every worker started and its imports done
            singles = []
            for i, spec in enumerate(specs):  # one at a time: each job with the cluster to itself
                wall, (record,) = run(backend, [spec], f"single-{i}")
                singles.append(wall)
                print(f"  alone {spec.key:<28} {wall:6.2f} s wall, {record['train_seconds']:6.2f} s training")
            wall, records = run(backend, specs, "parallel")
            startup = min(first_started(r) for r in records) - records[0]["submitted_at"]
        finally:
            backend.close()
    total, slowest = sum(singles), max(singles)
    ideal = total / workers
    target = 1.25 * ideal + startup
    print(f"sum of single jobs {total:.2f} s, max {slowest:.2f} s; {args.jobs} at once on K = {workers}: "
          f"wall {wall:.2f} s (startup {startup:.2f} s)")
    print(f"ratios: wall / (sum / K) = {wall / ideal:.2f}, wall / sum = {wall / total:.2f}, "
          f"wall / max = {wall / slowest:.2f}; target wall <= 1.25 x sum / K + startup = {target:.2f} s: "
          f"{'met' if wall <= target else 'missed'}")


if __name__ == "__main__":
    main()

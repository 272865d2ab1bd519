"""A fixed store for the report's golden files: every row written by hand, every timestamp fixed.

Built from store rows rather than by running the pipeline, so the golden files change only when the report
does: a change in how a run debates, trains or files its costs leaves this store as it is. It is rich enough to
reach every part of the report: the base society, multiagent FT, the STaR and single-agent FT baselines and the
no-summary ablation over two iterations, a zero-shot transfer task, finetuning sets with examples dropped as too
long, a retried job, a failed one and one still running (with their events), cut replies counted as no answer,
a billed ledger with estimates, diversity rows of every metric, sample debates (corrections, disagreements,
long and hostile model text), and a second run with nothing in it yet.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from orchestrator.store import (
    AgentRow,
    DatasetRow,
    DebateRow,
    DiversityRow,
    EvaluationRow,
    JobEventRow,
    JobRow,
    ProblemRow,
    ResponseRow,
    RunRow,
    Store,
    UsageRow,
)

RUN = "golden-run"
EMPTY = "empty <run>"
NOW = 1_767_268_800.0  # 2026-01-01 12:00:00 UTC: the clock the whole test runs under
T0 = NOW - 86_400.0  # the run began a day earlier
MODEL = "gpt-4.1-mini-2025-04-14"
TASK = "arithmetic:easy"
PAYLOAD = '<script>alert("pwned")</script>'

# The run's configuration as the store keeps it: literal JSON, so a new RunConfig default cannot change the store.
CONFIG = (
    '{"backend":"openai","model":"gpt-4.1-mini-2025-04-14","task":"arithmetic:easy","agents":3,"rounds":2,'
    '"iterations":2,"train_size":8,"eval_size":6,"seed":7,"strategy":"continue","summarize":true,"critic_mix":0.5,'
    '"critic_train_all_turns":false,"generation":{"temperature":0.7,"top_p":0.9,"max_tokens":96,'
    '"summary_max_tokens":128},"training":{"epochs":3,"batch_size":8,"learning_rate":0.0003,"lora_rank":8,'
    '"lora_alpha":16,"lora_dropout":0.05,"max_length":512,"target_modules":["q_proj","k_proj","v_proj","o_proj"]},'
    '"local":{"device":"auto","dtype":"auto","batch_size":48},"openai":{"api":"openai","base_url":null,'
    '"azure_endpoint":null,"api_version":null,"concurrency":16,"requests_per_minute":null,"tokens_per_minute":null,'
    '"max_retries":6,"give_up_after":900.0,"backoff_initial":1.0,"backoff_max":60.0,"timeout":120.0,"batch":false,'
    '"n_epochs":2,"batch_size":1,"learning_rate_multiplier":1.0,"poll_interval":30.0,"max_concurrent_jobs":6,'
    '"billed":"auto"},"together":{"base_url":null,"concurrency":16,"requests_per_minute":null,'
    '"tokens_per_minute":null,"max_retries":6,"give_up_after":900.0,"backoff_initial":1.0,"backoff_max":60.0,'
    '"timeout":120.0,"lora":true,"dedicated_endpoints":false,"n_epochs":2,"learning_rate":0.0001,"batch_size":"max",'
    '"lora_r":8,"lora_alpha":16,"poll_interval":30.0,"max_concurrent_jobs":6},"diversity":{"embeddings":"minilm",'
    '"embedding_model":null,"critic_nll":true}}'
)
EMPTY_CONFIG = CONFIG.replace('"backend":"openai","model":"gpt-4.1-mini-2025-04-14"',
                              '"backend":"local","model":"HuggingFaceTB/SmolLM2-135M-Instruct"')

QUESTIONS = {  # id -> (question, answer)
    "easy-eval-0": ("What is the result of 4+7*2-3? Make sure to state your answer at the end of the response.", "15"),
    "easy-eval-1": ("What is the result of 12-5*3+9? Make sure to state your answer at the end of the response.",
                    "6"),
    "easy-eval-2": ("What is the result of 8*3-4*5? Make sure to state your answer at the end of the response.", "4"),
    "easy-eval-3": ("Compute, step by step:\n  a = 3*4\n  b = a | 9 (read | as plus)\n  c = b - 0\n  d = c * 1\n"
                    "What is d? Answer with *one* number, e.g. `21`, and no <b>markup</b>. " + "Take care. " * 12,
                    "21"),
    "easy-eval-4": ("What is the result of 9+9*17? Make sure to state your answer at the end of the response.",
                    "162"),
    "easy-eval-5": ("What is the result of 6*7-2*21? Make sure to state your answer at the end of the response.",
                    "0"),
}


def _sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _accuracy(correct: int, n: int) -> tuple[float, float]:
    p = correct / n
    return p, math.sqrt(p * (1 - p) / n)


def _evaluations() -> list[EvaluationRow]:
    """(task, society, iteration) -> single (correct, unparseable, cut), majority, debate; n problems."""
    table: list[tuple[str, str, int, int, tuple[int, int, int] | None, tuple[int, int, int] | None,
                      tuple[int, int, int] | None]] = [
        (TASK, "base", 0, 6, (9, 3, 1), (3, 0, 0), (4, 1, 1)),
        (TASK, "maft", 1, 6, (11, 2, 0), (4, 0, 0), (4, 0, 0)),
        (TASK, "maft", 2, 6, (13, 1, 1), (5, 0, 0), (5, 0, 0)),
        (TASK, "star", 1, 6, (10, 2, 0), (4, 1, 0), (4, 0, 0)),
        (TASK, "star", 2, 6, (12, 1, 0), (5, 0, 0), (5, 1, 1)),
        (TASK, "single-ft", 1, 6, (10, 1, 0), (3, 0, 0), (4, 0, 0)),
        (TASK, "single-ft", 2, 6, (11, 1, 1), (4, 0, 0), (4, 0, 0)),
        (TASK, "no-summary", 1, 6, (10, 2, 2), (4, 0, 0), (3, 1, 1)),
        ("gsm8k", "base", 0, 5, (6, 4, 2), (2, 0, 0), (2, 1, 1)),
        ("gsm8k", "maft", 2, 5, (8, 2, 1), (3, 0, 0), (4, 0, 0)),
        ("gsm8k", "star", 2, 5, None, None, (3, 1, 0)),  # one method only: the other rows show no cell
    ]
    rows = []
    minute = 0
    for task, society, iteration, n, *methods in table:
        for method, counts in zip(("single", "majority", "debate"), methods, strict=True):
            if counts is None:
                continue
            correct, unparseable, cut = counts
            answers = 3 * n if method == "single" else None
            p, se = _accuracy(correct, answers or n)
            minute += 1
            rows.append(EvaluationRow(run_id=RUN, task=task, society=society, iteration=iteration, method=method,
                                      n=n, correct=correct, accuracy=p, stderr=se, unparseable=unparseable,
                                      truncated=cut, answers=answers, created_at=T0 + 60 * minute))
    return rows


def _datasets_and_jobs() -> tuple[list[DatasetRow], list[tuple[JobRow, list[JobEventRow]]]]:
    slots = [("maft", i, a, role) for i in (1, 2) for a in range(3) for role in ("generator", "critic")]
    slots += [(s, i, 0, "generator") for s in ("star", "single-ft") for i in (1, 2)]
    slots += [("no-summary", 1, a, role) for a in range(3) for role in ("generator", "critic")]
    slots += [("no-summary", 2, 0, role) for role in ("generator", "critic")]
    datasets, jobs = [], []
    for k, (society, iteration, agent, role) in enumerate(slots):
        where = "" if society == "maft" else f"{society}/"
        slot = f"{where}iteration-{iteration}/agent-{agent + 1}/{role}"
        if society in ("star", "single-ft"):
            slot = f"{society}/iteration-{iteration}/{role}"
        critic = role == "critic"
        too_long = {("maft", 2, 1, "critic"): 2, ("star", 2, 0, "generator"): 1}.get((society, iteration, agent, role),
                                                                                   0)
        created = T0 + 3_600 * iteration + 60 * k
        datasets.append(DatasetRow(
            run_id=RUN, society=society, iteration=iteration, agent=agent, role=role,
            path=f"maft-runs/{RUN}/{slot}.jsonl", sha256=_sha(slot), n_examples=5 + (k % 4) - too_long,
            n_generation=0 if critic else 5 + k % 4, n_critic_neg=1 + k % 2 if critic else 0,
            n_critic_pos=3 if critic else 0, n_critic_neg_available=2 + k % 3 if critic else 0,
            n_critic_pos_available=6 if critic else 0, problem_ids='["easy-train-0"]', n_too_long=too_long,
            created_at=created))
        key = f"{RUN}/{slot}"
        status, provider_status, error, loss, tokens, finished = "succeeded", "succeeded", None, 0.5 - 0.01 * k, \
            2_000 + 37 * k, created + 900 + 11 * k
        if (society, iteration, role) == ("no-summary", 2, "generator"):
            status, provider_status, loss, tokens, finished = "running", "validating_files", None, None, None
        if (society, iteration, role) == ("no-summary", 2, "critic"):
            status, provider_status, error, loss, tokens = "failed", "failed", \
                "training file rejected: <quota> exceeded | see *events*", None, None
        if (society, iteration, agent, role) == ("maft", 1, 1, "critic"):  # a failed first attempt, then a retry
            first = JobRow(key=f"{key}/attempt-1", run_id=RUN, society=society, iteration=iteration, agent=agent,
                           role=role, backend="openai", provider_job_id=f"ftjob-{k:03d}a", base_model_id=MODEL,
                           dataset_sha256=_sha(slot), status="failed", provider_status="failed", attempt=1,
                           error="server_error: the job failed on the provider's side", created_at=created,
                           updated_at=created + 300, finished_at=created + 300)
            jobs.append((first, [JobEventRow(job_key=first.key, created_at=created + 300, level="error",
                                             message="The job failed due to an internal error.")]))
        model_id = f"ft:{MODEL}:golden:{slot.replace('/', '-')}:id{k:03d}" if status == "succeeded" else None
        job = JobRow(key=key, run_id=RUN, society=society, iteration=iteration, agent=agent, role=role,
                     backend="openai", provider_job_id=f"ftjob-{k:03d}", base_model_id=MODEL,
                     dataset_sha256=_sha(slot), status=status, provider_status=provider_status,
                     attempt=2 if (society, iteration, agent, role) == ("maft", 1, 1, "critic") else 1,
                     model_id=model_id, train_loss=loss, trained_tokens=tokens, error=error, created_at=created,
                     updated_at=finished or NOW - 30, finished_at=finished)
        messages = ["Validating training file: file-golden", "Fine-tuning job started"]
        if status == "succeeded":
            messages += [f"Step {s}/30: training loss={0.9 - 0.1 * s / 10:.2f}" for s in (10, 20, 30)]
            messages += ["The job has successfully completed"]
        if error:
            messages += ["Error: " + error]
        events = [JobEventRow(job_key=key, created_at=created + 10 * (e + 1), level="error" if "Error" in m else "info",
                              message=m) for e, m in enumerate(messages)]
        jobs.append((job, events))
    return datasets, jobs


def _agents() -> list[AgentRow]:
    rows = []
    for iteration in range(3):
        for agent in range(3):
            for role in ("generator", "critic"):
                slot = f"iteration-{iteration}/agent-{agent + 1}/{role}"
                model_id = MODEL if iteration == 0 else f"ft:{MODEL}:golden:{slot.replace('/', '-')}:id"
                parent = None if iteration == 0 else MODEL
                rows.append(AgentRow(run_id=RUN, iteration=iteration, agent=agent, role=role, model_id=model_id,
                                     parent_model_id=parent, job_key=None if iteration == 0 else f"{RUN}/{slot}",
                                     created_at=T0 + 3_600 * iteration + agent))
    return rows


def _diversity() -> list[DiversityRow]:
    values = {  # (task, society, iteration) -> consensus, embedding dissimilarity, critic NLL (final)
        (TASK, "base", 0): (0.61, 0.412, 1.873),
        (TASK, "maft", 1): (0.72, 0.371, 1.702),
        (TASK, "maft", 2): (0.83, 0.334, 1.655),
        (TASK, "star", 1): (0.78, 0.301, 1.402),
        (TASK, "star", 2): (0.89, 0.262, 1.211),
        ("gsm8k", "base", 0): (0.55, 0.450, None),
        ("gsm8k", "maft", 2): (0.70, 0.390, None),
    }
    rows = []
    minilm = "1 - mean pairwise cosine of round-1 responses (all-MiniLM-L6-v2, first 256 tokens)"
    for (task, society, iteration), (cons, emb, nll) in values.items():
        created = T0 + 3_600 * iteration + 1_800
        rows.append(DiversityRow(run_id=RUN, task=task, society=society, iteration=iteration, metric="consensus",
                                 value=cons, n=6, created_at=created))
        rows.append(DiversityRow(run_id=RUN, task=task, society=society, iteration=iteration,
                                 metric="embedding_dissimilarity", value=emb, n=6, detail=minilm, created_at=created))
        if nll is not None:
            rows.append(DiversityRow(run_id=RUN, task=task, society=society, iteration=iteration,
                                     metric="critic_nll_final", value=nll, n=6, created_at=created))
    rows.append(DiversityRow(run_id=RUN, task=TASK, society="base", iteration=0, metric="critic_nll", value=2.104,
                             n=6, detail="earlier definition", created_at=T0 + 1_800))
    return rows


def _usage() -> list[UsageRow]:
    lines = [  # stage, debate, iteration, agent, role, billing, prompt, cached, completion, trained, cost, est
        ("evaluation", "eval-0", 0, 0, "generator", "standard", 1_200, 0, 340, 0, 0.001024, 0),
        ("evaluation", "eval-0", 0, 1, "critic", "standard", 2_900, 512, 410, 0, 0.001816, 0),
        ("evaluation", "eval-0", 0, None, "summarizer", "standard", 1_850, 0, 260, 0, 0.001156, 0),
        ("debate", "train-1", 1, 0, "generator", "standard", 1_320, 0, 355, 0, 0.001096, 0),
        ("debate", "train-1", 1, 2, "critic", "batch", 3_100, 1_024, 430, 0, 0.000932, 0),
        ("training", None, 1, 0, "generator", "training", 0, 0, 0, 24_000, 0.072, 0),
        ("training", None, 1, 1, "critic", "training", 0, 0, 0, 27_500, 0.0825, 0),
        ("evaluation", "eval-2", 2, 1, "critic", "standard", 3_050, 0, 400, 0, 0.00186, 0),
        ("evaluation", "star/eval-2", 2, 0, "generator", "standard", 1_250, 0, 330, 0, 0.001028, 0),
        ("training", None, 2, 0, "critic", "training", 0, 0, 0, 0, 0.0918, 1),
        ("diversity", None, 2, None, None, "embedding", 5_400, 0, 0, 0, 0.000108, 0),
        ("evaluation", "transfer/gsm8k/eval-2", 2, 2, "generator", "standard", 2_400, 0, 610, 0, 0.001936, 0),
        ("training", None, 2, 1, "generator", "training", 0, 0, 0, 3_000_000, 9.0, 0),
    ]
    rows = []
    for i, (stage, debate, it, agent, role, billing, prompt, cached, completion, trained, cost, est) in \
            enumerate(lines):
        training = billing == "training"
        estimate = (int(trained * 1.05) or 30_600, round(cost * 1.05, 6)) if training else (None, None)
        source = "package prices 2025-06 (gpt-4.1-mini)" if billing != "embedding" else \
            "package prices 2025-06 (text-embedding-3-small)"
        rows.append(UsageRow(run_id=RUN, stage=stage, debate=debate, iteration=it, agent=agent, role=role,
                             model=MODEL, ref=f"{RUN}/ledger/{i}", billing=billing, prompt_tokens=prompt,
                             cached_tokens=cached, completion_tokens=completion, trained_tokens=trained,
                             cost_usd=cost, estimated=est, price_source=source, created_at=T0 + 600 * i,
                             estimated_tokens=estimate[0], estimated_usd=estimate[1]))
    return rows


def _turn(debate: str, problem: str, rnd: int, agent: int, text: str, answer: str | None, *, cut: bool = False,
          kind: str = "answer", at: float) -> ResponseRow:
    return ResponseRow(key=f"{RUN}/{debate}/{problem}/r{rnd}/a{agent}/{kind}", run_id=RUN, debate=debate,
                       problem_id=problem, round=rnd, agent=agent, kind=kind, model_id=MODEL,
                       messages=json.dumps([{"role": "user", "content": f"{problem} round {rnd}"}]), text=text,
                       answer=answer, request_hash=_sha(f"{debate}/{problem}/{rnd}/{agent}/{kind}"),
                       finish_reason="length" if cut else "stop", prompt_tokens=120 + 10 * rnd,
                       completion_tokens=96 if cut else 30 + agent, created_at=at)


LONG_ANSWER = ("Let me work through it.\n```\na = 3*4 = 12\nb = 12 + 9 = 21\n```\nThe | sign is read as plus, so "
               "b = 21; c = b - 0 = 21 and d = c * 1 = 21.\n$d = 21$ and *nothing* else changes.\n"
               + "Checking once more: 21. " * 8 + "\nThe answer is 21.")

# (debate, problem) -> per agent: [(round-1 text, answer, cut), (round-2 text, answer, cut)]
Script = dict[tuple[str, str], list[list[tuple[str, str | None, bool]]]]
SCRIPT: Script = {
    ("eval-2", "easy-eval-0"): [  # agent 1 corrects itself; its first answer carries a script tag
        [(f"7*2 = 14, 4 + 14 = 18, minus 2 is 16. {PAYLOAD}", "16", False), ("I was off by one: 15.", "15", False)],
        [("4 + 14 - 3 = 15.", "15", False), ("Still 15.", "15", False)],
        [("15", "15", False), ("15, as the others say.", "15", False)],
    ],
    ("eval-2", "easy-eval-1"): [  # agents 2 and 3 correct themselves (agent 3's first reply was cut)
        [("12 - 15 + 9 = 6.", "6", False), ("6.", "6", False)],
        [("12 - 5 = 7, times 3 is 21, plus 9 is 30. Hmm, 7.", "7", False), ("Multiplication first: 6.", "6", False)],
        [("Let me expand every term very carefully, first 5*3 = 15, then 12 - 15 = -3, then", "3", True),
         ("-3 + 9 = 6.", "6", False)],
    ],
    ("eval-2", "easy-eval-2"): [  # all agree: not shown
        [("24 - 20 = 4.", "4", False), ("4.", "4", False)],
        [("4", "4", False), ("4", "4", False)],
        [("8*3 - 4*5 = 4.", "4", False), ("4.", "4", False)],
    ],
    ("eval-2", "easy-eval-3"): [  # a disagreement with long text, backticks and markdown in it
        [(LONG_ANSWER, "21", False), ("21, unchanged.", "21", False)],
        [("````\nb = 12 | 8 = 20\n````\nSo 20.", "20", False), ("I keep 20.", "20", False)],
        [("d = 21", "21", False), ("21", "21", False)],
    ],
    ("eval-2", "easy-eval-4"): [  # the society talks itself into the wrong answer
        [("9*17 = 153, + 9 = 162.", "162", False), ("Both of you say 90, so 90.", "90", False)],
        [("9 + 9 = 18, * 17 = 306? No, 90.", "90", False), ("90.", "90", False)],
        [("90", "90", False), ("90, I am sure.", "90", False)],
    ],
    ("eval-2", "easy-eval-5"): [  # an unreadable round-1 answer
        [("no idea", None, False), ("Still not sure.", None, False)],
        [("42 - 42 = 0.", "0", False), ("0.", "0", False)],
        [("0", "0", False), ("0", "0", False)],
    ],
    ("star/eval-2", "easy-eval-0"): [  # already shown from eval-2: skipped
        [("15", "15", False), ("15", "15", False)],
        [("16", "16", False), ("15", "15", False)],
        [("15", "15", False), ("15", "15", False)],
    ],
    ("star/eval-2", "easy-eval-2"): [  # the third correction
        [("8*3 = 24, 4*5 = 20, 24 - 20 = 44?", "44", False), ("24 - 20 = 4.", "4", False)],
        [("4", "4", False), ("4", "4", False)],
        [("4", "4", False), ("4", "4", False)],
    ],
    ("train-1", "easy-train-0"): [
        [("3 + 4 = 7.", "7", False), ("7.", "7", False)],
        [("3 + 4 = 8.", "8", False), ("7.", "7", False)],
        [("It is 7.", "7", False), ("7.", "7", False)],
    ],
    ("transfer/gsm8k/eval-2", "gsm8k-test-17"): [
        [("She pays 3 * $4 = $12, then ... (a long derivation that stops", "12", True), ("$12.", "12", False)],
        [("12 dollars.", "12", False), ("12", "12", False)],
        [("#### 12", "12", False), ("#### 12", "12", False)],
    ],
}
FINALS = {  # (debate, problem) -> final answer, correct, votes, consensus
    ("eval-2", "easy-eval-0"): ("15", 1, ["15", "15", "15"], 1.0),
    ("eval-2", "easy-eval-1"): ("6", 1, ["6", "6", "6"], 1.0),
    ("eval-2", "easy-eval-2"): ("4", 1, ["4", "4", "4"], 1.0),
    ("eval-2", "easy-eval-3"): ("21", 1, ["21", "20", "21"], 2 / 3),
    ("eval-2", "easy-eval-4"): ("90", 0, ["90", "90", "90"], 1.0),
    ("eval-2", "easy-eval-5"): ("0", 1, [None, "0", "0"], 2 / 3),
    ("star/eval-2", "easy-eval-0"): ("15", 1, ["15", "15", "15"], 1.0),
    ("star/eval-2", "easy-eval-2"): ("4", 1, ["4", "4", "4"], 1.0),
    ("train-1", "easy-train-0"): ("7", None, ["7", "7", "7"], 1.0),
    ("transfer/gsm8k/eval-2", "gsm8k-test-17"): ("12", 1, ["12", "12", "12"], 1.0),
}


def _debates() -> tuple[list[ResponseRow], list[DebateRow]]:
    responses, debates = [], []
    at = T0
    for (debate, problem), agents in SCRIPT.items():
        at += 60
        for agent, turns in enumerate(agents):
            for rnd, (text, answer, cut) in enumerate(turns, start=1):
                if rnd > 1 and not debate.startswith("train"):  # what this agent's critic saw first
                    others = " / ".join(t[0][0][:24] for i, t in enumerate(agents) if i != agent)
                    responses.append(_turn(debate, problem, rnd, agent, f"The others said: {others}", None,
                                           kind="summary", cut=agent == 2 and problem == "easy-eval-3", at=at))
                responses.append(_turn(debate, problem, rnd, agent, text, answer, cut=cut, at=at + rnd))
        final, correct, votes, consensus = FINALS[(debate, problem)]
        debates.append(DebateRow(run_id=RUN, debate=debate, problem_id=problem, final_answer=final, correct=correct,
                                 votes=json.dumps(votes), consensus=consensus, created_at=at + 5))
    for problem in QUESTIONS:  # the base society's debate: rows, but no responses kept to show
        debates.append(DebateRow(run_id=RUN, debate="eval-0", problem_id=problem, final_answer="1", correct=0,
                                 votes=json.dumps(["1", "2", None]), consensus=1 / 3, created_at=T0 + 30))
    return responses, debates


def build_store(path: Path) -> Store:
    """The fixed store. Call it with the clock at `NOW` (save_run and save_job stamp `updated_at`)."""
    store = Store(path)
    store.save_run(RunRow(id=RUN, config=CONFIG, status="failed", backend="openai", model=MODEL, task=TASK,
                          iterations_done=2, created_at=T0,
                          error="finetuning job golden-run/no-summary/iteration-2/agent-1/critic failed: "
                                "training file rejected: <quota> exceeded | see *events*"))
    store.save_run(RunRow(id=EMPTY, config=EMPTY_CONFIG, backend="local", model="HuggingFaceTB/SmolLM2-135M-Instruct",
                          task=TASK, created_at=NOW - 600))
    problems = [ProblemRow(run_id=RUN, split="eval", position=i, problem_id=pid, question=q, answer=a)
                for i, (pid, (q, a)) in enumerate(QUESTIONS.items())]
    problems.append(ProblemRow(run_id=RUN, split="train", position=0, problem_id="easy-train-0",
                               question="What is the result of 3+4?", answer="7"))
    store.save_problems(problems)
    store.save_agents(_agents())
    responses, debates = _debates()
    for response in responses:
        store.save_response(response)
    store.save_debates(debates)
    datasets, jobs = _datasets_and_jobs()
    store.save_datasets(datasets)
    for job, events in jobs:
        store.save_job(job, events)
    store.record_usage(_usage())
    for row in _evaluations():
        store.save_evaluation(row)
    store.save_diversity(_diversity())
    return store

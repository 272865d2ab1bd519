"""Using a run's society on the user's own questions: `orchestrator ask` (one question, the debate shown) and
`orchestrator solve` (a JSONL file of questions, a JSONL file of answers).

Both reuse everything the run already knows: its stored configuration (backend, model, sampling, summaries,
seed), its backend and its stored societies. A question has no ground truth, so it is put to the debate as a
`Problem` with no answer: the task's own parser reads each reply and its grader decides which answers are the
same for the vote, but nothing is graded. The debate is a normal `DebateRunner` debate under a name of its own
(`ask-K/INPUT`, `solve-K/INPUT`, see `orchestrator.names`), so every reply is stored the moment it arrives, paid
for in the cost ledger under stage "ask" or "solve", held to `--max-cost` before each round, and found again by
the same command: asking the same thing twice (or again after a crash) asks the backend nothing already answered.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from foundation.errors import UserError
from orchestrator.config import RunConfig
from orchestrator.costs import Ledger, run_pricing
from orchestrator.debate import DebateOutcome, Society
from orchestrator.interrupts import never
from orchestrator.names import DebateName
from orchestrator.pipeline import Pipeline
from orchestrator.societies import MAFT
from orchestrator.store import Store, StoreState
from orchestrator.tasks import Problem

ASK_ID = "question"  # the one problem of an `ask` debate
REPLY_CHARS = 400  # how much of each reply `ask` shows: enough to follow the reasoning, short enough to scan
MAX_QUESTION_CHARS = 100_000  # a question longer than this is a mistake (a file pasted whole), not a question


# which society ------------------------------------------------------------------------------------------------


class Chosen(BaseModel):
    """The society a question is put to: the multiagent society at `iteration` (0 is the base society)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    iteration: int
    society: Society

    @property
    def name(self) -> str:
        """How `solve`'s output (and `serve`'s model list) names it: RUN@base, RUN@1, ..."""
        return f"{self.run_id}@{'base' if self.iteration == 0 else self.iteration}"

    @property
    def label(self) -> str:
        return "the base society" if self.iteration == 0 else f"multiagent FT, iteration {self.iteration}"


def trained_iterations(store: Store, run_id: str) -> list[int]:
    """The iterations (1, 2, ...) whose multiagent society is stored, i.e. whose finetunes all ended."""
    return sorted(i for name, i in store.societies(run_id) if name == MAFT and i > 0)


def choose_society(pipeline: Pipeline, wanted: str | None) -> Chosen:
    """`--society base|N`; by default the last iteration the run has trained (the base society if none)."""
    return chosen_from_store(pipeline.store, pipeline.config, pipeline.run_row.id, wanted)


def chosen_from_store(store: Store, config: RunConfig, run_id: str, wanted: str | None) -> Chosen:
    """`choose_society` without a backend (for `export`)."""
    store.require_run(run_id)
    trained = trained_iterations(store, run_id)
    choices = "base" + "".join(f", {i}" for i in trained)
    if wanted is None:
        iteration = trained[-1] if trained else 0
    elif wanted.strip().lower() in ("base", "0"):
        iteration = 0
    elif wanted.strip().isdigit():
        iteration = int(wanted)
        if iteration not in trained:
            raise UserError(f"run '{run_id}' has no society of iteration {iteration}: use --society with one of "
                            f"{choices}")
    else:
        raise UserError(f"--society '{wanted}' is not a society: use base or an iteration number ({choices})")
    rows = {(r.agent, r.role): r.model_id for r in store.get_agents(run_id, iteration, MAFT)}
    agents = range(config.agents)
    if len(rows) == 2 * config.agents:
        society = Society(generators=[rows[(i, "generator")] for i in agents],
                          critics=[rows[(i, "critic")] for i in agents])
    elif iteration == 0:
        society = Society.base(config.agents)
    else:  # listed a moment ago, and a society is never deleted
        raise UserError(f"run '{run_id}' has no complete society of iteration {iteration}")
    return Chosen(run_id=run_id, iteration=iteration, society=society)


def rounds_for(config: RunConfig, rounds: int | None) -> int:
    if rounds is None:
        return config.rounds
    if rounds < 1:
        raise UserError(f"--rounds must be 1 or more, got {rounds}")
    return rounds


# the run's backend, prices and ledger -----------------------------------------------------------------------


class UseOptions(BaseModel):
    """What `ask` and `solve` take beside the question(s): which run and society, and how to reach and pay it."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    society: str | None = None  # base | N; None: the last trained iteration
    rounds: int | None = None  # None: the run's
    workdir: Path | None = None  # None: the run's folder (where a local run keeps its adapters)
    max_cost: float | None = None  # the run's budget as a whole, as `run` and `eval` hold it
    prices: Path | None = None
    quiet: bool = False


@contextmanager
def open_society(store: Store, config: RunConfig, options: UseOptions, console: Console,
                 checkpoint: Callable[[], None] = never) -> Iterator[Pipeline]:
    """The run's backend (checked before anything is spent, as `run` checks it), priced, with a ledger that holds
    `--max-cost`, inside a `Pipeline` of the stored run that only debates: nothing of the run itself changes."""
    from backends import create_backend
    from backends.base import ChecksServer, NeedsCredentials

    if options.max_cost is not None and options.max_cost < 0:
        raise UserError(f"--max-cost must be 0 or more dollars, got {options.max_cost}")
    run_row = store.require_run(options.run_id)
    work = options.workdir or store.path.resolve().parent / "maft-runs" / options.run_id
    backend = create_backend(config.backend, config.model, config.backend_settings(), workdir=work,
                             state=StoreState(store, config.backend), show_progress=not options.quiet,
                             training=config.training)
    try:
        pricing = run_pricing(backend.describe(), options.prices, max_cost=options.max_cost, console=console)
        if isinstance(backend, NeedsCredentials):
            backend.check_credentials()
        if isinstance(backend, ChecksServer):
            backend.check_server(finetuning=False)
        ledger = Ledger(store, options.run_id, pricing, max_cost=options.max_cost,
                        batch=config.backend == "openai" and config.openai.batch)
        yield Pipeline(config=config, run=run_row, store=store, backend=backend, workdir=work, console=console,
                       show_progress=not options.quiet, ledger=ledger, checkpoint=checkpoint)
    finally:
        backend.close()


def input_digest(kind: str, data: bytes, rounds: int) -> str:
    """What names an ask or solve debate beside the society: the question (or the input file's bytes) and the
    rounds. The same again finds its stored replies; anything else is a debate of its own (though a request
    asked word for word before, e.g. a question kept in an edited file, is still answered from the store)."""
    return hashlib.sha256(f"{kind}\n{rounds}\n".encode() + data).hexdigest()[:16]


def tally(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> dict[str, int]:
    """The vote's counts: each readable answer's class (spelled as its first member, as the vote spells its
    winner) with how many agents gave it, the largest first; unreadable answers do not vote."""
    classes: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        home = next((c for c in classes if equivalent(c[0], answer)), None)
        if home is None:
            classes.append([answer])
        else:
            home.append(answer)
    return {c[0]: len(c) for c in sorted(classes, key=len, reverse=True)}


def usage_of(store: Store, run_id: str, debate: str) -> tuple[int, int, float]:
    """Generations, tokens and dollars of one debate: its stored replies (reused ones included, at no cost)."""
    responses = store.get_responses(run_id, debate).values()
    cost = sum(u.cost_usd for u in store.get_usage(run_id) if u.debate == debate)
    return len(responses), sum(r.prompt_tokens + r.completion_tokens for r in responses), cost


# ask ------------------------------------------------------------------------------------------------------------


def ask(pipeline: Pipeline, question: str, chosen: Chosen, rounds: int) -> tuple[str, DebateOutcome]:
    """One debate of `chosen` on `question`; its name and outcome."""
    if not question.strip():
        raise UserError("the question is empty: give the question as one argument, in quotes")
    if len(question) > MAX_QUESTION_CHARS:
        raise UserError(f"the question is {len(question):,} characters long (at most {MAX_QUESTION_CHARS:,}): for "
                        "many questions use `orchestrator solve --input FILE`")
    digest = input_digest("ask", question.encode(), rounds)
    name = str(DebateName(stage="ask", iteration=chosen.iteration, input=digest))
    problem = Problem(id=ASK_ID, question=question, answer="")
    outcome = pipeline.debate(name, [problem], chosen.society, chosen.iteration, pipeline.settings(rounds=rounds))[0]
    return name, outcome


def _short_model(model: str) -> str:
    """A model id as a reader tells them apart: a local adapter by its folder's name, a hosted id whole."""
    return Path(model).name if os.sep in model else model


def debate_view(outcome: DebateOutcome, chosen: Chosen, equivalent: Callable[[str, str], bool]) -> Group:
    """The debate as people read it: each round's answer and reply per agent, then the vote, the final answer
    last. Model text is shown as text, never as rich markup."""
    parts: list[Any] = [Text.assemble(("question: ", "bold"), outcome.problem.question)]
    rounds = len(outcome.agents[0].answers) if outcome.agents else 0
    for rnd in range(1, rounds + 1):
        table = Table(title=f"round {rnd} · {'generators' if rnd == 1 else 'critics'}", title_justify="left",
                      show_lines=True, expand=False)
        table.add_column("agent", justify="right")
        table.add_column("answer")
        table.add_column("reply", overflow="fold", max_width=100)
        table.add_column("model", style="dim", overflow="fold", max_width=40)
        for n, transcript in enumerate(outcome.agents):
            reply = transcript.messages[2 * rnd - 1].content if len(transcript.messages) >= 2 * rnd else ""
            cut = transcript.cut[rnd - 1] if len(transcript.cut) >= rnd else False
            answer = transcript.answers[rnd - 1]
            shown = " ".join(reply.split())
            shown = shown if len(shown) <= REPLY_CHARS else shown[:REPLY_CHARS].rstrip() + " …"
            model = chosen.society.model(n, "generator" if rnd == 1 else "critic")
            table.add_row(f"{n + 1}", Text("no answer (cut)" if cut else "no answer") if answer is None
                          else Text(answer), Text(shown), Text(_short_model(model)))
        parts.append(table)
    finals = [a.answers[-1] for a in outcome.agents]
    counts = tally(finals, equivalent)
    unread = sum(a is None for a in finals)
    votes = ", ".join(f"{escape(answer)} × {count}" for answer, count in counts.items()) or "none"
    parts.append(Text.from_markup(f"[bold]vote[/] (last round): {votes}"
                                  + (f", no answer × {unread}" if unread else "")))
    vote = outcome.vote
    tie = " (a tie, broken by the run's seed)" if vote.tied else ""
    parts.append(Text(f"agreement: {vote.support}/{len(finals)} = {100 * vote.consensus:.0f} %{tie}"))
    final = Text("final answer: ", style="bold")
    final.append(vote.final if vote.final is not None else "none (no agent gave a readable answer)",
                 style="bold green" if vote.final is not None else "bold red")
    parts.append(final)
    return Group(*parts)


# solve ----------------------------------------------------------------------------------------------------------


class Question(BaseModel):
    """One line of `solve`'s input."""

    model_config = ConfigDict(frozen=True)

    id: Any  # as the file gave it (a string or an integer), written back as it was; the line number if none
    key: str  # str(id): the problem id in the store
    question: str
    line: int


INPUT_FIX = 'write one JSON object per line, e.g. {"question": "What is 2+3?", "id": "q1"}'


def read_questions(path: Path) -> tuple[bytes, list[Question]]:
    """The input file's bytes (for its digest) and its questions; a broken file is one UserError naming the line
    and the fix, before anything is asked."""
    where = f"input file '{path}'"
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{where} is a directory: give a .jsonl file of questions") from None
    except FileNotFoundError:
        raise UserError(f"{where} does not exist: give a .jsonl file of questions, one per line") from None
    except OSError as exc:
        raise UserError(f"{where} cannot be read ({exc.strerror}): check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text ({exc.reason}): save it as UTF-8") from None
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{where} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{at} is not valid JSON ({exc.msg}): {INPUT_FIX}") from None
        if not isinstance(row, dict):
            raise UserError(f"{at} is not a JSON object: {INPUT_FIX}")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{at} has no 'question' string: {INPUT_FIX}")
        raw_id = row.get("id", number)
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or str(raw_id).strip() == "":
            raise UserError(f"{at} has id {json.dumps(raw_id)}: give a non-empty string or an integer, or no id "
                            "(the line number is used)")
        key = str(raw_id)
        if key in seen:
            raise UserError(f"{at} repeats id '{key}' from line {seen[key]}: give every question its own id")
        seen[key] = number
        questions.append(Question(id=raw_id, key=key, question=question, line=number))
    if not questions:
        raise UserError(f"{where} has no questions: {INPUT_FIX}")
    return data, questions


def solve_name(data: bytes, chosen: Chosen, rounds: int) -> str:
    """The debate a file's questions are answered in: the society, and a digest of the file and the rounds."""
    return str(DebateName(stage="solve", iteration=chosen.iteration, input=input_digest("solve", data, rounds)))


def answer_line(question: Question, outcome: DebateOutcome, chosen: Chosen,
                equivalent: Callable[[str, str], bool]) -> dict[str, Any]:
    finals = [a.answers[-1] for a in outcome.agents]
    return {"id": question.id, "answer": outcome.vote.final, "votes": tally(finals, equivalent),
            "agreement": round(outcome.vote.consensus, 6), "society": chosen.name}


def solve(pipeline: Pipeline, questions: Sequence[Question], data: bytes, chosen: Chosen, rounds: int,
          output: Path) -> str:
    """Answer every question in one debate and write `output`; the debate's name.

    Resumable: every reply is stored as it arrives, so a second `solve` after a crash (kill -9 included) asks the
    backend only what is missing. The output is written once, at the end, to a temporary file renamed over
    `output`, from the debate's outcomes in input order, rather than appended as answers come: the debate runs
    each round for all questions before the next round, so no answer is final before the last round of all of
    them, and a file written whole can hold no half-written line and no id twice, however often `solve` was
    killed and run again."""
    problems = [Problem(id=q.key, question=q.question, answer="") for q in questions]
    name = solve_name(data, chosen, rounds)
    outcomes = pipeline.debate(name, problems, chosen.society, chosen.iteration, pipeline.settings(rounds=rounds))
    equivalent = pipeline.task.equivalent
    lines = [json.dumps(answer_line(q, o, chosen, equivalent), ensure_ascii=False) + "\n"
             for q, o in zip(questions, outcomes, strict=True)]
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_text("".join(lines), encoding="utf-8")
    os.replace(partial, output)
    return name


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False

"""`orchestrator ask`, `solve` and `export` on a finished run (conftest's `finished`: see tests/finished_run.py),
through the real CLI in a subprocess. Requests go one at a time (`concurrency = 1`), so a process killed right
after storing a reply has no other request in flight: a resumed `solve` must then send nothing twice, not "at most
a few".
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.names import DebateName
from orchestrator.use import input_digest
from tests.finished_run import AGENTS, KILLED, PER_QUESTION, ROUNDS, RUN, chats, cli, ledger, output, responses

# ask ------------------------------------------------------------------------------------------------------------

ROW = re.compile(r"^│\s*(\d+)\s*│\s*(.+?)\s*│")


def last_round_answers(stdout: str) -> list[str]:
    """The answer cell of each agent's row in the last round's table, as printed."""
    rounds = re.split(r"^round \d+ · \w+\s*$", stdout, flags=re.M)
    assert len(rounds) == ROUNDS + 1, stdout
    rows = [ROW.match(line) for line in rounds[-1].splitlines()]
    answers = [m[2] for m in rows if m]
    assert len(answers) == AGENTS, stdout
    return answers


def test_ask_prints_every_round_and_the_majority_of_the_last_as_its_final_answer(finished, tmp_path):
    work = finished.copy(tmp_path)
    before = chats(finished.fake)
    proc = cli(work, "ask", RUN, "7+8", "--quiet")
    assert proc.returncode == 0, output(proc)
    lines = proc.stdout.splitlines()
    assert "multiagent FT, iteration 1" in lines[0]
    answers = last_round_answers(proc.stdout)
    final = re.search(r"^final answer: (.+)$", proc.stdout, re.M)
    assert final is not None and lines[-2].startswith("final answer:"), proc.stdout
    counts = Counter(a for a in answers if not a.startswith("no answer"))
    top = max(counts.values())
    assert final[1] in {a for a, n in counts.items() if n == top}, proc.stdout  # the printed round's majority
    vote = re.search(r"^vote \(last round\): (.+)$", proc.stdout, re.M)
    assert vote is not None and f"{final[1]} × {top}" in vote[1], proc.stdout
    assert re.search(rf"^agreement: {top}/{AGENTS} = ", proc.stdout, re.M), proc.stdout
    assert "ft:gpt-4.1-mini" in proc.stdout  # the finetuned agents answered, not the base model
    # every generation of the debate went to the server once and into the ledger under "ask"
    assert chats(finished.fake) - before == PER_QUESTION
    assert len(ledger(work, "ask")) == PER_QUESTION
    assert f"{PER_QUESTION} generations" in lines[-1]

    again = cli(work, "ask", RUN, "7+8", "--quiet")  # the same question: answered from the store, free
    assert again.returncode == 0, output(again)
    assert chats(finished.fake) - before == PER_QUESTION
    assert re.search(r"^final answer: (.+)$", again.stdout, re.M)[1] == final[1]
    assert len(ledger(work, "ask")) == PER_QUESTION

    base = cli(work, "ask", RUN, "7+8", "--society", "base", "--rounds", "1", "--quiet")
    assert base.returncode == 0, output(base)
    assert "the base society" in base.stdout.splitlines()[0] and "ft:" not in base.stdout
    assert chats(finished.fake) - before == PER_QUESTION + AGENTS  # one round, no summaries


def test_ask_holds_the_runs_budget_and_refuses_unknown_societies(finished, tmp_path):
    work = finished.copy(tmp_path)
    before = chats(finished.fake)
    broke = cli(work, "ask", RUN, "2+2", "--max-cost", "0.000001", "--quiet")
    assert broke.returncode == 1, output(broke)
    assert "budget" in broke.stdout and f"orchestrator ask {RUN}" in broke.stdout
    for society in ("7", "first"):
        refused = cli(work, "ask", RUN, "2+2", "--society", society)
        assert refused.returncode == 2, output(refused)
        assert len(refused.stderr.strip().splitlines()) == 1 and "base, 1" in refused.stderr
    assert chats(finished.fake) == before and ledger(work, "ask") == []


# solve ----------------------------------------------------------------------------------------------------------

QUESTIONS = [{"question": "3+4", "id": "a"}, {"question": "10+9"}, {"question": "12+0", "id": 7},
             {"question": "5+5", "id": "d"}, {"question": "1+19"}, {"question": "20+20", "id": "f"}]
IDS = ["a", 2, 7, "d", 5, "f"]  # an id as given, else the line number


def test_solve_killed_mid_file_resumes_asking_nothing_twice_and_writes_each_id_once(finished, tmp_path):
    work = finished.copy(tmp_path)
    questions = work / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    answers = work / "answers.jsonl"
    name = DebateName(stage="solve", iteration=1, input=input_digest("solve", questions.read_bytes(), ROUNDS))
    command = ("solve", RUN, "--input", str(questions), "--output", str(answers), "--quiet")
    before, repeated = chats(finished.fake), finished.fake.repeated_chats()

    # killed in round 2's summaries, after 25 of the file's 54 generations were stored
    killed = cli(work, *command, crash_at=f"debate.{name}.stored#25")
    assert killed.returncode == KILLED, output(killed)
    assert not answers.exists()
    assert chats(finished.fake) - before == 25

    done = cli(work, *command)
    assert done.returncode == 0, output(done)
    assert chats(finished.fake) - before == len(QUESTIONS) * PER_QUESTION  # each generation asked once
    assert finished.fake.repeated_chats() == repeated
    lines = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert [line["id"] for line in lines] == IDS  # each id once, in input order
    for line in lines:
        assert set(line) == {"id", "answer", "votes", "agreement", "society"}
        assert line["society"] == f"{RUN}@1"
        assert sum(line["votes"].values()) <= AGENTS
        if line["answer"] is not None:
            assert line["votes"][line["answer"]] == max(line["votes"].values())
            assert line["agreement"] == pytest.approx(line["votes"][line["answer"]] / AGENTS)
    refs = ledger(work, "solve")
    assert len(refs) == len(set(refs)) == len(QUESTIONS) * PER_QUESTION  # every generation paid for once

    text = answers.read_text(encoding="utf-8")
    again = cli(work, *command)  # all stored: nothing asked, the same file
    assert again.returncode == 0, output(again)
    assert chats(finished.fake) - before == len(QUESTIONS) * PER_QUESTION
    assert answers.read_text(encoding="utf-8") == text

    cost = cli(work, "cost", RUN, "--json")
    assert cost.returncode == 0, output(cost)
    assert "solve" in {s["stage"] for s in json.loads(cost.stdout)["by_stage"]}


@pytest.mark.parametrize(("content", "fragments"), [
    ('{"question": "1+1"}\n{"question": "2+2"\n', ("line 2", "not valid JSON", "one JSON object per line")),
    ('{"question": "1+1"}\n{"id": "x"}\n', ("line 2", "no 'question'")),
    ('{"question": "1+1", "id": "x"}\n\n{"question": "2+2", "id": "x"}\n', ("line 3", "repeats id 'x'", "line 1")),
    ('["1+1"]\n', ("line 1", "not a JSON object")),
    ('{"question": "1+1", "id": [1]}\n', ("line 1", "id [1]")),
    ("", ("has no questions",)),
    ("\n\n", ("has no questions",)),
])
def test_a_broken_input_file_is_one_line_and_exit_2_with_nothing_asked(finished, tmp_path, content, fragments):
    work = finished.copy(tmp_path)
    stored, before = responses(work), chats(finished.fake)
    questions = work / "questions.jsonl"
    questions.write_text(content, encoding="utf-8")
    answers = work / "answers.jsonl"
    proc = cli(work, "solve", RUN, "--input", str(questions), "--output", str(answers))
    assert proc.returncode == 2, output(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not answers.exists() and responses(work) == stored and chats(finished.fake) == before


def test_solve_refuses_a_missing_input_and_an_output_that_is_the_input(finished, tmp_path):
    work = finished.copy(tmp_path)
    missing = cli(work, "solve", RUN, "--input", str(work / "none.jsonl"), "--output", str(work / "out.jsonl"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr, output(missing)
    questions = work / "q.jsonl"
    questions.write_text('{"question": "1+1"}\n', encoding="utf-8")
    same = cli(work, "solve", RUN, "--input", str(questions), "--output", str(questions))
    assert same.returncode == 2 and "is the input file" in same.stderr, output(same)
    assert questions.read_text(encoding="utf-8") == '{"question": "1+1"}\n'



# the local backend -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny random model of the crash tests (taught to end with "The answer is N.") and a finished local run of
    one iteration on it: (model folder, run folder)."""
    from tests.test_crash import build_answering_model, local_settings, write_config

    folder = tmp_path_factory.mktemp("local")
    model = build_answering_model(folder / "model")
    work = folder / "work"
    write_config(work, local_settings(model, iterations=1))
    proc = cli(work, "run", "--config", str(work / "run.toml"), "--name", RUN, "--quiet")
    assert proc.returncode == 0, output(proc)
    db = sqlite3.connect(work / "m.db")
    trained = db.execute("select count(*) from jobs where run_id = ? and status = 'succeeded'", [RUN]).fetchone()[0]
    db.close()
    assert trained > 0  # some agent really has an adapter
    return model, work


def test_ask_on_the_local_backend_debates_with_the_runs_adapters(local_run):
    """`ask` on the local backend: the finetuned agents (LoRA adapters in the run's folder) answer, and the final
    answer is the printed last round's majority."""
    _, work = local_run
    asked = cli(work, "ask", RUN, "4+3", "--quiet")
    assert asked.returncode == 0, output(asked)
    assert "multiagent FT, iteration 1" in asked.stdout.splitlines()[0]
    answers = last_round_answers(asked.stdout)
    counts = Counter(a for a in answers if not a.startswith("no answer"))
    final = re.search(r"^final answer: (.+)$", asked.stdout, re.M)
    assert final is not None, asked.stdout
    if counts:
        top = max(counts.values())
        assert final[1] in {a for a, n in counts.items() if n == top}, asked.stdout
    else:
        assert final[1].startswith("none"), asked.stdout
    db = sqlite3.connect(work / "m.db")
    stored = db.execute("select count(*) from responses where debate like 'ask-1/%'").fetchone()[0]
    db.close()
    assert stored == PER_QUESTION


# export ------------------------------------------------------------------------------------------------------------


def trained_adapters(work: Path) -> dict[tuple[int, str], tuple[str, str]]:
    """(agent from 1, role) -> (adapter folder, dataset sha256) of iteration 1's trained agents."""
    db = sqlite3.connect(work / "m.db")
    try:
        return {(r[0] + 1, r[1]): (r[2], r[3]) for r in db.execute(
            "select a.agent, a.role, a.model_id, j.dataset_sha256 from agents a join jobs j on j.key = a.job_key "
            "where a.run_id = ? and a.iteration = 1 and j.status = 'succeeded'", [RUN])}
    finally:
        db.close()


def greedy(model, tokenizer, text: str) -> list[int]:
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_export_peft_writes_each_adapter_with_a_card_and_a_manifest(local_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, work = local_run
    out = tmp_path / "society"
    proc = cli(work, "export", RUN, "--to", str(out))
    assert proc.returncode == 0, output(proc)
    manifest = json.loads((out / "society.json").read_text(encoding="utf-8"))
    assert manifest["society"] == f"{RUN}@1" and manifest["format"] == "peft" and manifest["rounds"] == ROUNDS
    assert len(manifest["agents"]) == 2 * AGENTS
    trained = trained_adapters(work)
    for agent in manifest["agents"]:
        slot = (agent["agent"], agent["role"])
        assert agent["trained"] == (slot in trained)
        if slot not in trained:
            assert agent["folder"] is None
            continue
        folder = out / agent["folder"]
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert trained[slot][1] in card and str(model_dir) in card and "| debate |" in card
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        loaded = PeftModel.from_pretrained(base, str(folder))
        assert loaded.active_adapter == "default"
    assert not list(tmp_path.glob(".*.partial"))

    again = cli(work, "export", RUN, "--to", str(out))  # never over an earlier export
    assert again.returncode == 2 and "already exists" in again.stderr, output(again)


def test_a_merged_export_loads_without_peft_and_answers_as_the_adapter_does(local_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, work = local_run
    out = tmp_path / "merged"
    proc = cli(work, "export", RUN, "--to", str(out), "--format", "merged")
    assert proc.returncode == 0, output(proc)
    manifest = json.loads((out / "society.json").read_text(encoding="utf-8"))
    trained = trained_adapters(work)
    (agent, role), (adapter, _) = sorted(trained.items())[0]
    folder = next(a["folder"] for a in manifest["agents"] if (a["agent"], a["role"]) == (agent, role))
    assert not (out / folder / "adapter_config.json").exists() and (out / folder / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the result of 4+3?"}],
                                           tokenize=False, add_generation_prompt=True)
    merged = AutoModelForCausalLM.from_pretrained(out / folder)
    through_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    assert greedy(merged, tokenizer, prompt) == greedy(through_peft, tokenizer, prompt)
    untrained = [a for a in manifest["agents"] if not a["trained"]]
    assert all(a["folder"] == "base" for a in untrained)
    assert (out / "base" / "config.json").is_file() == bool(untrained)


def test_export_of_a_hosted_run_is_its_manifest_of_model_ids(finished, tmp_path):
    work = finished.copy(tmp_path / "work")
    out = tmp_path / "society"
    proc = cli(work, "export", RUN, "--to", str(out), "--society", "1")
    assert proc.returncode == 0, output(proc)
    manifest = json.loads((out / "society.json").read_text(encoding="utf-8"))
    assert manifest["format"] is None and manifest["backend"] == "openai"
    assert [p.name for p in out.iterdir()] == ["society.json"]
    assert any(a["model_id"].startswith("ft:gpt-4.1-mini") for a in manifest["agents"])

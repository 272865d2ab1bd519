"""`orchestrator serve` on a finished run (conftest's `finished`, see tests/finished_run.py), in a subprocess,
driven over loopback by the official `openai` SDK (and by httpx where the SDK cannot send the request: a body that
is not JSON, no key at all)."""

from __future__ import annotations

import queue
import re
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.finished_run import AGENTS, PER_QUESTION, ROUNDS, RUN, chats, cli_command, cli_env, ledger

KEY = "serve-test-key-0123"
URL = re.compile(r"http://127\.0\.0\.1:(\d+)/v1")


class Serving:
    def __init__(self, proc: subprocess.Popen[str], base_url: str, lines: list[str]) -> None:
        self.proc, self.base_url, self.lines = proc, base_url, lines
        self.client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)


@contextmanager
def serving(work: Path, *args: str) -> Iterator[Serving]:
    """`orchestrator serve RUN --port 0 ARGS` until the block ends, then Ctrl-C; its output lines so far in
    `lines` (stdout and stderr together)."""
    proc = subprocess.Popen(cli_command(work, "serve", RUN, "--port", "0", *args), cwd=work, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if (m := URL.search(line)) is not None:
                found.put(m[0])
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = found.get(timeout=120)
        assert url is not None, "".join(lines)
        yield Serving(proc, url, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stored_tokens(work: Path, debate: str, problem: str) -> tuple[int, int, int]:
    """(replies, prompt tokens, completion tokens) the store holds for one question of one debate."""
    db = sqlite3.connect(work / "m.db")
    try:
        row = db.execute("select count(*), sum(prompt_tokens), sum(completion_tokens) from responses where run_id = ? "
                         "and debate = ? and problem_id = ?", [RUN, debate, problem]).fetchone()
    finally:
        db.close()
    return int(row[0]), int(row[1] or 0), int(row[2] or 0)


def ask(serving: Serving, question: str, model: str = RUN) -> openai.types.chat.ChatCompletion:
    return serving.client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}])


def test_serve_answers_with_the_majority_and_the_debates_usage_and_debates_concurrent_requests_together(
        finished, tmp_path):
    work = finished.copy(tmp_path)
    before = chats(finished.fake)
    with serving(work, "--api-key", KEY, "--batch-window", "2") as server:
        models = [m.id for m in server.client.models.list()]
        assert models == [RUN, f"{RUN}@base", f"{RUN}@1"]

        with ThreadPoolExecutor(2) as pool:  # arrive together: one debate of both
            answers = list(pool.map(lambda q: ask(server, q), ["7+8", "12+30"]))
        extras = [a.model_extra["maft"] for a in answers]
        assert extras[0]["debate"] == extras[1]["debate"] and extras[0]["debate"].startswith("serve-1/")
        assert extras[0]["problem"] != extras[1]["problem"]
        assert chats(finished.fake) - before == 2 * PER_QUESTION
        for answer, maft in zip(answers, extras, strict=True):
            assert answer.model == RUN and maft["society"] == f"{RUN}@1"
            assert answer.choices[0].finish_reason == "stop"
            votes = maft["votes"]
            assert sum(votes.values()) <= AGENTS and maft["answer"] is not None
            assert votes[maft["answer"]] == max(votes.values())  # the majority's answer
            assert maft["agreement"] == pytest.approx(votes[maft["answer"]] / AGENTS)
            assert maft["answer"] in answer.choices[0].message.content  # the chain of an agent that gave it
            replies, prompt, completion = stored_tokens(work, maft["debate"], maft["problem"])
            assert replies == maft["generations"] == PER_QUESTION
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt, completion)
            assert answer.usage.total_tokens == prompt + completion > 0
        assert len(ledger(work, "serve")) == 2 * PER_QUESTION  # every generation paid for, under its own stage

        base = ask(server, "7+8", model=f"{RUN}@base")
        assert base.model_extra["maft"]["debate"].startswith("serve-0/")
        # the base society's answers are its own; a summary (by the base model) may repeat one word for word
        asked = chats(finished.fake) - before
        assert 2 * PER_QUESTION + AGENTS * ROUNDS <= asked <= 3 * PER_QUESTION

        again = ask(server, "7+8")  # asked before: from the store, free, the same answer
        assert chats(finished.fake) - before == asked
        assert again.choices[0].message.content == answers[0].choices[0].message.content
    assert server.proc.returncode == 0, "".join(server.lines)
    assert "stopped serving" in "".join(server.lines)


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return body["error"]


def test_each_bad_request_gets_openais_error_shape_and_the_server_keeps_serving(finished, tmp_path):
    work = finished.copy(tmp_path)
    with serving(work, "--api-key", KEY) as server:
        good = ask(server, "3+4")
        before = chats(finished.fake)
        url = f"{server.base_url}/chat/completions"
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"model": RUN, "messages": [{"role": "user", "content": "3+4"}]}

        def still_serving() -> None:
            assert ask(server, "3+4").choices[0].message.content == good.choices[0].message.content

        wrong = openai.OpenAI(base_url=server.base_url, api_key="not-the-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model=RUN, messages=[{"role": "user", "content": "3+4"}])
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        still_serving()
        assert error_of(httpx.post(url, json=body))["code"] == "invalid_api_key"  # no key at all
        assert httpx.get(f"{server.base_url}/models").status_code == 401
        still_serving()

        with pytest.raises(openai.NotFoundError) as caught:
            ask(server, "3+4", model=f"{RUN}@7")
        assert caught.value.code == "model_not_found" and f"{RUN}@base" in caught.value.message
        still_serving()

        malformed = httpx.post(url, content=b'{"model": "use", "messages": [', headers=auth)
        assert malformed.status_code == 400 and "JSON" in str(error_of(malformed)["message"])
        still_serving()

        with pytest.raises(openai.BadRequestError) as caught:
            server.client.chat.completions.create(model=RUN, messages=[{"role": "system", "content": "be brief"}])
        assert caught.value.param == "messages"
        with pytest.raises(openai.BadRequestError) as caught:
            server.client.chat.completions.create(model=RUN, messages=[{"role": "user", "content": "3+4"}],
                                                  stream=True)
        assert caught.value.param == "stream"
        missing = httpx.post(url, json={"model": RUN}, headers=auth)
        assert missing.status_code == 400 and error_of(missing)["param"] == "messages"
        assert error_of(httpx.get(f"{server.base_url}/nowhere", headers=auth))["type"] == "invalid_request_error"
        still_serving()
        assert chats(finished.fake) == before  # nothing of it was debated
    assert server.proc.returncode == 0, "".join(server.lines)


def test_serve_over_its_budget_refuses_with_429_and_keeps_serving(finished, tmp_path):
    work = finished.copy(tmp_path)
    before = chats(finished.fake)
    with serving(work, "--max-cost", "0.000001") as server:
        with pytest.raises(openai.RateLimitError) as caught:
            ask(server, "5+6")
        assert caught.value.status_code == 429 and caught.value.code == "insufficient_quota"
        assert "budget" in caught.value.message
        assert [m.id for m in server.client.models.list()][0] == RUN  # no key asked, still up
    assert chats(finished.fake) == before and ledger(work, "serve") == []
    assert server.proc.returncode == 0, "".join(server.lines)


def test_serve_refuses_a_taken_port_and_an_empty_key_in_one_line(finished, tmp_path):
    import socket

    work = finished.copy(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = subprocess.run(cli_command(work, "serve", RUN, "--port", port), cwd=work, env=cli_env(),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    empty = subprocess.run(cli_command(work, "serve", RUN, "--api-key", " "), cwd=work, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1, empty.stderr


def test_a_key_given_on_the_command_line_never_reaches_the_failure_log(tmp_path, capsys):
    from orchestrator.failures import CommandContext, argv_secrets, finish

    assert argv_secrets(["serve", "r", "--api-key", KEY, "--port", "1"]) == [KEY]
    assert argv_secrets(["serve", "r", f"--api-key={KEY}"]) == [KEY]
    context = CommandContext()
    context.at(tmp_path)
    try:
        raise RuntimeError(f"a failure that quotes {KEY}")
    except RuntimeError as exc:
        status = finish(exc, context, ["serve", "r", "--api-key", KEY])
    assert status == 1
    log = (tmp_path / "errors.log").read_text(encoding="utf-8")
    assert "a failure that quotes ***" in log and KEY not in log and KEY not in capsys.readouterr().err

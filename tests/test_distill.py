"""The student's distillation set built from a hand-made society, checked chain by chain (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.base import ChatMessage
from orchestrator.debate import AgentTranscript, DebateOutcome
from orchestrator.distill import DistillRequest, answering_costs, distillation_examples, distillation_pairs
from orchestrator.names import DebateName
from orchestrator.tasks import Problem
from orchestrator.voting import Vote


def eq(a: str, b: str) -> bool:
    return float(a) == float(b)


def prompt(pid: str) -> str:
    return f"round-1 prompt for {pid}"


def transcript(pid: str, agent: int, rounds: list[tuple[str | None, str]], cut: list[bool] | None = None,
               tokens: list[int] | None = None) -> AgentTranscript:
    """Agent n's conversation: (answer, chain text) per round; later prompts carry the others' answers."""
    messages = []
    for r, (_, chain) in enumerate(rounds, start=1):
        messages.append(ChatMessage(role="user", content=prompt(pid) if r == 1 else f"{pid} a{agent} debate r{r}"))
        messages.append(ChatMessage(role="assistant", content=chain))
    return AgentTranscript(messages=messages, answers=[a for a, _ in rounds], cut=cut or [False] * len(rounds),
                           tokens=tokens or [])


def chain(pid: str, agent: int, answer: str | None, rnd: int) -> tuple[str | None, str]:
    return answer, f"{pid} a{agent} says {answer} r{rnd}"


def outcome(pid: str, agents: list[AgentTranscript], final: str | None, truth: str = "0") -> DebateOutcome:
    return DebateOutcome(problem=Problem(id=pid, question=pid, answer=truth), agents=agents,
                         vote=Vote(final=final, support=0, voters=0, consensus=0.0))  # support recounted


# N = 3, M = 2.
# p1: unanimous 1; agent 0 repeats its round-1 chain word for word in round 2 and agent 2's round 1 is the same
#     text: each distinct chain once. Agent 1 corrects 2 -> 1 (its final chain is kept, its round 1 is not).
# p2: a held-out problem, unanimous: never data.
# p3: no strict majority (5, 6, 7): nothing.
# p4: 2-to-1 final 3.
# p5: the ground truth (9) is a minority answer: agent 0's round-1 9 is right by it, yet dropped (never looked at);
#     agent 1's round-1 8 agrees with ŷ but was cut at max_tokens: dropped.
X1, Y2, Y1, Z1 = "p1 chain x = 1", "p1 chain y = 2", "p1 chain y' = 1", "p1 chain z = 1"
DEBATES = [
    outcome("p1", [transcript("p1", 0, [("1", X1), ("1", X1)], tokens=[11, 22]),
                   transcript("p1", 1, [("2", Y2), ("1", Y1)], tokens=[12, 23]),
                   transcript("p1", 2, [("1", X1), ("1", Z1)], tokens=[11, 24])], "1"),
    outcome("p2", [transcript("p2", n, [chain("p2", n, "2", 1), chain("p2", n, "2", 2)]) for n in range(3)], "2"),
    outcome("p3", [transcript("p3", n, [chain("p3", n, a, 1), chain("p3", n, a, 2)])
                   for n, a in enumerate(["5", "6", "7"])], "5"),
    outcome("p4", [transcript("p4", 0, [chain("p4", 0, "3", 1), chain("p4", 0, "3", 2)]),
                   transcript("p4", 1, [chain("p4", 1, "4", 1), chain("p4", 1, "3", 2)]),
                   transcript("p4", 2, [chain("p4", 2, "4", 1), chain("p4", 2, "4", 2)])], "3"),
    outcome("p5", [transcript("p5", 0, [chain("p5", 0, "9", 1), chain("p5", 0, "8", 2)]),
                   transcript("p5", 1, [chain("p5", 1, "8", 1), chain("p5", 1, "8", 2)], cut=[True, False]),
                   transcript("p5", 2, [chain("p5", 2, "8", 1), chain("p5", 2, "8", 2)])], "8", truth="9"),
]
HELD_OUT = {"p2"}


def test_the_set_is_every_distinct_agreeing_round_1_and_final_chain_of_the_training_problems():
    examples = distillation_examples(DEBATES, HELD_OUT, eq)
    assert [(e.problem_id, e.messages[1].content) for e in examples] == [
        ("p1", X1), ("p1", Y1), ("p1", Z1),
        ("p4", chain("p4", 0, "3", 1)[1]), ("p4", chain("p4", 0, "3", 2)[1]), ("p4", chain("p4", 1, "3", 2)[1]),
        ("p5", chain("p5", 0, "8", 2)[1]), ("p5", chain("p5", 1, "8", 2)[1]),
        ("p5", chain("p5", 2, "8", 1)[1]), ("p5", chain("p5", 2, "8", 2)[1]),
    ]
    # single pass: the round-1 prompt for the question, then the chain, whatever round the chain was written in
    assert all([m.role for m in e.messages] == ["user", "assistant"] for e in examples)
    assert {e.messages[0].content for e in examples} == {prompt("p1"), prompt("p4"), prompt("p5")}
    assert json.loads(examples[1].to_json()) == {"messages": [{"role": "user", "content": prompt("p1")},
                                                              {"role": "assistant", "content": Y1}]}
    # a round-1 chain's length is round 1's stored one; a final-round chain's, in this new context, is unknown
    assert [e.tokens for e in examples[:3]] == [11, None, None]


def test_held_out_problems_never_give_data_even_when_their_debates_are_passed_in():
    assert "p2" not in {e.problem_id for e in distillation_examples(DEBATES, HELD_OUT, eq)}
    assert "p2" in {e.problem_id for e in distillation_examples(DEBATES, set(), eq)}
    assert distillation_examples(DEBATES, {"p1", "p2", "p4", "p5"}, eq) == []


def test_ground_truth_is_never_looked_at():
    """Changing every problem's ground truth changes nothing."""
    moved = [o.model_copy(update={"problem": o.problem.model_copy(update={"answer": "1"})}) for o in DEBATES]
    assert distillation_examples(moved, HELD_OUT, eq) == distillation_examples(DEBATES, HELD_OUT, eq)
    assert distillation_pairs(moved, HELD_OUT, eq) == distillation_pairs(DEBATES, HELD_OUT, eq)


def test_dpo_pairs_put_each_chain_of_the_majority_against_each_readable_chain_of_another_answer():
    pairs = distillation_pairs(DEBATES, HELD_OUT, eq)
    got = [(p.problem_id, p.chosen, p.rejected, round(p.weight, 6)) for p in pairs]
    p4 = lambda n, a, r: chain("p4", n, a, r)[1]  # noqa: E731
    p5 = lambda n, a, r: chain("p5", n, a, r)[1]  # noqa: E731
    assert got == [
        ("p1", X1, Y2, 1.0), ("p1", Y1, Y2, 1.0), ("p1", Z1, Y2, 1.0),  # 3/3 − v(2) = 0
        *[("p4", good, bad, round(2 / 3 - 1 / 3, 6))
          for good in (p4(0, "3", 1), p4(0, "3", 2), p4(1, "3", 2))
          for bad in (p4(1, "4", 1), p4(2, "4", 1), p4(2, "4", 2))],
        # the cut round-1 chain of agent 1 is neither side; the ground truth's 9 is rejected like any other
        *[("p5", good, p5(0, "9", 1), 1.0) for good in (p5(0, "8", 2), p5(1, "8", 2), p5(2, "8", 1), p5(2, "8", 2))],
    ]
    assert all(p.messages == [ChatMessage(role="user", content=prompt(p.problem_id))] for p in pairs)


# -- the flow, on the scripted backend -------------------------------------------------------------------------------


def _distilled(tmp_path, backend, iterations: int = 1, level: int | None = None):
    return _distilled_with(tmp_path, backend, DistillRequest(iteration=level), iterations)


def _distilled_with(tmp_path, backend, request: DistillRequest, iterations: int = 1):
    from rich.console import Console

    from orchestrator.config import RunConfig
    from orchestrator.pipeline import Pipeline, open_run
    from orchestrator.store import Store

    config = RunConfig(train_size=12, eval_size=8, seed=2, iterations=iterations)
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "r", must_exist=False)
    pipeline = Pipeline(config=config, run=row, store=store, backend=backend, workdir=tmp_path / "w",
                        console=Console(quiet=True), show_progress=False, poll_interval=0)
    pipeline.run()
    asked = len(backend.requests)
    pipeline.run_more(distill=request)
    return store, pipeline, asked


def test_the_student_is_trained_on_the_last_society_s_consensus_and_answers_each_held_out_problem_once(tmp_path):
    from tests.fakes import ScriptedBackend

    backend = ScriptedBackend()
    store, pipeline, before = _distilled(tmp_path, backend)
    train, held_out = pipeline.problems()
    teacher = pipeline.stored_society("maft", 1)
    assert teacher is not None
    # the iteration-1 society's own debate on the training problems (no later iteration's to read back)
    outcomes = pipeline.debate("distill/train-1", train, teacher, 1)
    expected = distillation_examples(outcomes, {p.id for p in held_out}, pipeline.task.equivalent)
    (dataset,) = store.get_datasets("r", society="distill")
    written = Path(dataset.path).read_text().splitlines()
    assert expected and [json.loads(line) for line in written] == [json.loads(e.to_json()) for e in expected]
    assert not set(json.loads(dataset.problem_ids)) & {p.id for p in held_out}
    (spec,) = [s for s in backend.specs if s.key.startswith("r/distill/")]
    assert spec.key == "r/distill/iteration-1/student" and spec.base_model == "base"
    student = pipeline.stored_society("distill", 1)
    assert student is not None and student.generators[0] != "base"
    # evaluated answering once: one agent, one round, one request per held-out problem
    evals = [r for r in backend.requests[before:] if "/distill/eval-1/" in f"/{r.key}"]
    assert len(evals) == len(held_out)
    assert {r.model for r in evals} == {student.generators[0]}
    rows = {e.method: e for e in store.get_evaluations("r") if e.society == "distill"}
    assert set(rows) == {"single", "majority", "debate"} and rows["debate"].iteration == 1
    assert DebateName.parse("distill/eval-1") == DebateName(stage="eval", iteration=1, society="distill")
    # distilling again asks nothing and trains nothing
    specs, asked = len(backend.specs), len(backend.requests)
    pipeline.run_more(distill=DistillRequest())
    assert (len(backend.specs), len(backend.requests)) == (specs, asked)


def test_an_earlier_iteration_is_distilled_from_the_following_iteration_s_stored_training_debate(tmp_path):
    from tests.fakes import ScriptedBackend

    backend = ScriptedBackend()
    store, _, before = _distilled(tmp_path, backend, iterations=2, level=1)
    keys = [r.key for r in backend.requests[before:]]
    assert keys and all("distill/eval-1" in k for k in keys)  # train-2 is read back: only the evaluation is asked
    assert {d.iteration for d in store.get_datasets("r", society="distill")} == {1}


def tiny_local_run(tmp_path: Path) -> Path:
    """A finished 1-iteration run `tiny` of the tiny answering model on the local backend (store `m.db`, files `w`
    under `tmp_path`); the model's directory."""
    from rich.console import Console

    from backends.base import TrainingParams
    from backends.local import LocalBackend
    from orchestrator.config import GenerationConfig, RunConfig
    from orchestrator.pipeline import Pipeline, open_run
    from orchestrator.store import Store
    from tests.test_crash import build_answering_model

    model = build_answering_model(tmp_path / "tiny")
    config = RunConfig(model=str(model), train_size=6, eval_size=2, seed=147,
                       generation=GenerationConfig(max_tokens=8, summary_max_tokens=8),
                       training=TrainingParams(epochs=1, batch_size=2, learning_rate=1e-3, max_length=256))
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "tiny", must_exist=False)
    backend = LocalBackend(str(model), workdir=tmp_path / "w", device="cpu", show_progress=False)
    Pipeline(config=config, run=row, store=store, backend=backend, workdir=tmp_path / "w",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    backend.close()
    store.close()
    return model


def test_orchestrator_distill_trains_and_evaluates_a_student_on_the_local_backend_with_a_tiny_model(tmp_path):
    """A tiny local run, then `orchestrator distill RUN` through the CLI: a real LoRA student, trained on the
    consensus file, evaluated once per held-out problem, shown by `report`; a second `distill` redoes nothing."""
    from click.testing import CliRunner

    from orchestrator.cli import cli
    from orchestrator.store import Store

    tiny_local_run(tmp_path)
    args = ["distill", "tiny", "--db", str(tmp_path / "m.db"), "--workdir", str(tmp_path / "w"), "--quiet"]
    result = CliRunner().invoke(cli, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    store = Store(tmp_path / "m.db")
    (job,) = [j for j in store.get_jobs("tiny") if j.society == "distill"]
    assert job.key == "tiny/distill/iteration-1/student" and job.status == "succeeded" and job.base_model_id == "base"
    assert (Path(job.model_id or "") / "adapter_model.safetensors").is_file()
    (dataset,) = store.get_datasets("tiny", society="distill")
    assert dataset.n_examples > 0 and dataset.sha256 == job.dataset_sha256
    held_out = {p.problem_id for p in store.get_problems("tiny", "eval")}
    assert not set(json.loads(dataset.problem_ids)) & held_out
    assert {a.model_id for a in store.get_agents("tiny", 1, "distill")} == {job.model_id}
    answers = [r for r in store.get_responses("tiny", "distill/eval-1").values()]
    assert len(answers) == len(held_out) and {r.round for r in answers} == {1}
    assert {e.society for e in store.get_evaluations("tiny")} == {"base", "maft", "distill", "soup"}
    # the soup: the iteration-1 generators' adapters averaged, answering once too
    soup = store.get_agents("tiny", 1, "soup")
    assert len({a.model_id for a in soup}) == 1 and (Path(soup[0].model_id) / "adapter_config.json").is_file()
    assert len(store.get_responses("tiny", "soup/eval-1")) == len(held_out)
    store.close()
    report = CliRunner().invoke(cli, ["report", "tiny", "--db", str(tmp_path / "m.db")], env={"COLUMNS": "200"})
    assert report.exit_code == 0 and "distilled student" in report.output, report.output
    costs = {c.label: c for c in answering_costs(Store(tmp_path / "m.db"), "tiny", "arithmetic:easy")}
    assert set(costs) == {"base, single agent", "base, debate", "multiagent FT, single agent",
                          "multiagent FT, debate", "distilled student", "society soup"}
    assert costs["distilled student"].generations == 1.0 and costs["base, single agent"].generations == 1.0
    assert costs["multiagent FT, debate"].generations >= 3 * 3  # N·(2M−1) answers, plus summaries
    assert 0 < costs["distilled student"].tokens < costs["multiagent FT, debate"].tokens
    assert "generations / problem" in report.output
    status = CliRunner().invoke(cli, ["status", "tiny", "--db", str(tmp_path / "m.db")], env={"COLUMNS": "200"})
    assert status.exit_code == 0 and "distill/eval-1" in status.output and "soup/eval-1" in status.output
    later = CliRunner().invoke(cli, [*args, "--iteration", "2"])
    assert later.exit_code != 0 and "--iteration 2: run tiny has 1 finished iteration(s)" in str(later.exception)
    check = Store(tmp_path / "m.db")
    assert check.get_run("tiny").status == "finished"  # a refused distill leaves the run as it was
    check.close()
    again = CliRunner().invoke(cli, args, terminal_width=200)
    assert again.exit_code == 0, again.output
    store = Store(tmp_path / "m.db")
    assert len([j for j in store.get_jobs("tiny") if j.society == "distill"]) == 1
    assert len(store.get_responses("tiny", "distill/eval-1")) == len(held_out)


# -- the student on the hosted fakes ---------------------------------------------------------------------------------


def _hosted_distill(tmp_path, make_backend, cfg, pricing, request: DistillRequest | None = None):
    """A 1-iteration run on a hosted fake, then its student distilled, through the pipeline as the CLI drives it."""
    from rich.console import Console

    from orchestrator.costs import Ledger
    from orchestrator.pipeline import Pipeline, open_run
    from orchestrator.store import Store

    store = Store(tmp_path / "m.db")
    row = open_run(store, cfg, "r", must_exist=False)
    backend = make_backend(store)
    try:
        pipeline = Pipeline(config=cfg, run=row, store=store, backend=backend, workdir=tmp_path / "w",
                            console=Console(quiet=True), show_progress=False, poll_interval=0.01,
                            ledger=Ledger(store, "r", pricing))
        pipeline.run()
        pipeline.run_more(distill=request or DistillRequest())
    finally:
        backend.close()
    return store


def openai_student(tmp_path, fake_openai, request: DistillRequest | None = None):
    """`_hosted_distill` on the fake OpenAI server, priced as gpt-4.1-mini."""
    from backends.openai import OpenAIBackend
    from orchestrator.costs import Pricing, load_prices
    from orchestrator.store import StoreState
    from tests.test_openai_run import MINI, config

    cfg = config(fake_openai)
    return _hosted_distill(
        tmp_path, lambda store: OpenAIBackend(cfg.model, cfg.openai, StoreState(store, "openai"), show_progress=False,
                                              environ={"OPENAI_API_KEY": fake_openai.api_key}),
        cfg, Pricing(load_prices(), MINI), request)


def together_student(tmp_path, fake_together, request: DistillRequest | None = None):
    """`_hosted_distill` on the fake Together server, priced as its base model."""
    from backends.together import TogetherBackend
    from orchestrator.costs import Pricing, load_prices
    from orchestrator.store import StoreState
    from tests.test_together_run import config

    cfg = config(fake_together)
    return _hosted_distill(
        tmp_path, lambda store: TogetherBackend(
            cfg.model, cfg.together, StoreState(store, "together"), show_progress=False,
            environ={"TOGETHER_API_KEY": fake_together.api_key}),
        cfg, Pricing(load_prices(), cfg.model, full_finetune=not cfg.together.lora), request)


def _check_hosted_student(store, jobs_created: int, n_agents: int) -> None:
    (job,) = [j for j in store.get_jobs("r") if j.society == "distill"]
    assert job.key == "r/distill/iteration-1/student" and job.status == "succeeded" and job.base_model_id == "base"
    assert jobs_created == 2 * n_agents + 1  # the society's 2N, then the student's one
    (dataset,) = store.get_datasets("r", society="distill")
    assert dataset.n_examples > 0 and dataset.sha256 == job.dataset_sha256
    assert {a.model_id for a in store.get_agents("r", 1, "distill")} == {job.model_id}
    held_out = {p.problem_id for p in store.get_problems("r", "eval")}
    answers = store.get_responses("r", "distill/eval-1")
    assert len(answers) == len(held_out) and {r.model_id for r in answers.values()} == {job.model_id}
    costs = {c.label: c for c in answering_costs(store, "r", "arithmetic:easy")}
    student, debate = costs["distilled student"], costs["multiagent FT, debate"]
    assert student.generations == 1.0 and 0 < student.usd < debate.usd  # dollars, from the ledger
    training = [u for u in store.get_usage("r") if u.stage == "training" and u.ref == job.key]
    assert training and training[0].cost_usd > 0


@pytest.mark.fake_openai(base_accuracy=0.8, finetune_bonus=0.1)
def test_the_student_on_the_fake_openai_server(tmp_path, fake_openai):
    from tests.test_openai_run import N

    store = openai_student(tmp_path, fake_openai)
    _check_hosted_student(store, fake_openai.counts["POST /v1/fine_tuning/jobs"], N)
    (job,) = [j for j in store.get_jobs("r") if j.society == "distill"]
    assert (job.model_id or "").startswith("ft:")


@pytest.mark.fake_together(base_accuracy=0.8)
def test_the_student_on_the_fake_together_server(tmp_path, fake_together):
    from tests.test_together_run import N

    store = together_student(tmp_path, fake_together)
    _check_hosted_student(store, fake_together.counts["POST /v1/fine-tunes"], N)


@pytest.mark.fake_together(base_accuracy=0.6)
def test_a_dpo_student_on_the_fake_together_server_learns_the_majority_s_chains_against_the_others(
        tmp_path, fake_together):
    from backends.preference_data import HostedPreferenceLine

    store = together_student(tmp_path, fake_together, DistillRequest(objective="dpo"))
    (job,) = [j for j in store.get_jobs("r") if j.society == "distill"]
    assert job.status == "succeeded"
    remote = fake_together.jobs[job.provider_job_id]
    assert remote["training_method"]["method"] == "dpo"
    (dataset,) = store.get_datasets("r", society="distill")
    assert dataset.n_pairs and dataset.n_pairs == dataset.n_pairs_generator
    lines = Path(str(dataset.pairs_path)).read_text().splitlines()
    assert len(lines) == dataset.n_pairs and job.dataset_sha256 == dataset.pairs_sha256
    assert all(HostedPreferenceLine.model_validate_json(line) for line in lines)


def test_a_dpo_student_is_refused_on_a_backend_without_dpo(tmp_path):
    from foundation.errors import UserError
    from tests.fakes import ScriptedBackend

    with pytest.raises(UserError, match='distill --objective "dpo" does not run on the scripted backend'):
        _distilled_with(tmp_path, ScriptedBackend(), DistillRequest(objective="dpo"))


# -- the society soup ------------------------------------------------------------------------------------------------


def _deltas(adapter: Path) -> dict[str, object]:
    """Each LoRA module's delta s·B·A (s = lora_alpha / r), by module."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("use_dora")
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    return {k.replace(".lora_A.weight", ""): scale * (weights[k.replace("lora_A", "lora_B")] @ weights[k])
            for k in weights if k.endswith(".lora_A.weight")}


def test_the_society_soup_is_exactly_the_mean_of_the_adapters_deltas(tmp_path):
    """Three adapters of different ranks and scalings (lora_alpha 1×, 2×, ½× r): the soup's delta on every module
    is (1/3)·Σ s_i·B_i·A_i, to float32 rounding."""
    import torch

    from backends.local import LocalBackend
    from tests.tiny_model import build_random_adapter, build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    adapters = []
    for i, (rank, alpha) in enumerate([(2, 2), (4, 8), (8, 4)]):
        path = build_random_adapter(model, tmp_path / f"a{i}", seed=i, rank=rank)
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
        adapters.append(path)
    backend = LocalBackend(str(model), workdir=tmp_path / "w", device="cpu", show_progress=False)
    soup = Path(backend.average_adapters([str(a) for a in adapters], tmp_path / "soup"))
    got = _deltas(soup)
    each = [_deltas(a) for a in adapters]
    assert set(got) == set(each[0]) and got
    for module, delta in got.items():
        mean = sum(d[module] for d in each) / 3  # type: ignore[operator]
        assert torch.allclose(delta, mean, atol=1e-6), module  # type: ignore[arg-type]
        assert not torch.allclose(delta, each[0][module], atol=1e-4)  # type: ignore[arg-type]
    assert backend.average_adapters([str(a) for a in adapters], tmp_path / "soup") == str(soup)  # written once


def test_the_soup_of_the_default_job_is_made_on_the_bundled_model_named_by_its_alias(tmp_path):
    """The default job's model is the bundled alias, which only our loader resolves (transformers would look it up
    on the hub): the soup is averaged on the model the run's adapters were trained on."""
    import torch

    from backends.local import LocalBackend
    from backends.local_model import load_model
    from backends.local_settings import DEFAULT_MODEL
    from tests.tiny_model import build_random_adapter

    cache = Path(load_model(DEFAULT_MODEL, "cpu", "float32").path)
    adapters = [str(build_random_adapter(cache, tmp_path / f"a{i}", seed=i, rank=2, target_modules=("q_proj",)))
                for i in range(2)]
    backend = LocalBackend(DEFAULT_MODEL, workdir=tmp_path / "w", device="cpu", show_progress=False)
    got = _deltas(Path(backend.average_adapters(adapters, tmp_path / "soup")))
    each = [_deltas(Path(a)) for a in adapters]
    assert len(got) == 30  # q_proj of each of SmolLM2-135M's 30 layers
    for module, delta in got.items():
        assert torch.allclose(delta, (each[0][module] + each[1][module]) / 2, atol=1e-6), module  # type: ignore[operator]


def test_run_with_distill_distils_the_last_iteration_after_the_run(tmp_path):
    from rich.console import Console

    from orchestrator.config import RunConfig
    from orchestrator.pipeline import Pipeline, open_run
    from orchestrator.store import Store
    from tests.fakes import ScriptedBackend

    config = RunConfig(train_size=12, eval_size=8, seed=2, iterations=2)
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "r", must_exist=False)
    Pipeline(config=config, run=row, store=store, backend=ScriptedBackend(), workdir=tmp_path / "w",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run(distill=DistillRequest())
    assert {(e.society, e.iteration) for e in store.get_evaluations("r") if e.society == "distill"} == {("distill", 2)}
    assert [j.key for j in store.get_jobs("r") if j.society == "distill"] == ["r/distill/iteration-2/student"]
    assert store.get_run("r").status == "finished"

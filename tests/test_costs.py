"""Prices, the ledger, the budget and the dry run, on the scripted backend (no network)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from backends.base import BackendInfo, MemoryState
from backends.openai import OpenAIBackend
from backends.openai_settings import OpenAIConfig
from backends.together import TogetherBackend
from backends.together_settings import TogetherConfig
from foundation.errors import RunStopped, UserError
from orchestrator.config import RunConfig
from orchestrator.costs import (
    Ledger,
    Pricing,
    cost_summary,
    load_prices,
    model_size_b,
    run_pricing,
    split_model_id,
)
from orchestrator.estimate import estimate_run
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.report.terminal import cost_tables
from orchestrator.store import Store
from orchestrator.tasks import get_task
from tests.fakes import ScriptedBackend

MINI = "gpt-4.1-mini-2025-04-14"
NO_DOTENV = Path("/nonexistent/.env")


class BilledBackend(ScriptedBackend):
    """The scripted backend, priced as if it were gpt-4.1-mini."""

    def describe(self) -> BackendInfo:
        return BackendInfo(name="scripted", base_model=MINI, billed=True, training_epochs=2)


def test_price_lookup_by_name_alias_snapshot_and_finetuned_id():
    table = load_prices()
    assert table.lookup(MINI)[0] == MINI
    assert table.lookup("gpt-4.1-mini")[0] == MINI
    assert table.lookup("gpt-4.1-mini-2099-01-01")[0] == MINI
    assert table.lookup("llama-3-8b") is None
    assert split_model_id(f"ft:{MINI}:org:suffix:abc") == (MINI, True)
    pricing = Pricing(table, MINI)
    # 1M prompt tokens of which 400k cached, 1M completion: base vs finetuned rates, and the batch discount
    assert pricing.chat("base", 1_000_000, 400_000, 1_000_000) == pytest.approx(0.6 * 0.40 + 0.4 * 0.10 + 1.60)
    ft = f"ft:{MINI}:org:s:1"
    assert pricing.chat(ft, 1_000_000, 0, 0) == pytest.approx(0.80)
    assert pricing.chat("base", 1_000_000, 0, 1_000_000, batch=True) == pytest.approx((0.40 + 1.60) / 2)
    assert pricing.training("base", 2_000_000) == pytest.approx(10.0)
    assert pricing.chat("some-local-model", 10**6, 0, 10**6) == 0.0
    assert "no price" in pricing.source("some-local-model")


def test_a_user_price_file_replaces_entries_and_bad_files_are_user_errors(tmp_path):
    mine = tmp_path / "p.toml"
    mine.write_text(f'[models."{MINI}"]\ninput = 1.0\ncached_input = 0.5\noutput = 2.0\ntraining = 3.0\n'
                    'source = "my contract, 2026-11"\n')
    table = load_prices(mine)
    assert table.models[MINI].input == 1.0 and table.models[MINI].source == "my contract, 2026-11"
    assert "gpt-4o-mini-2024-07-18" in table.models
    with pytest.raises(UserError, match="does not exist"):
        load_prices(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.x]\ninput = -1\ncached_input = 0\noutput = 0\nsource = "s"\n')
    with pytest.raises(UserError, match="models.x.input"):
        load_prices(bad)


def run_priced(tmp_path, backend, max_cost=None, **overrides):
    config = RunConfig(**{"train_size": 12, "eval_size": 5, **overrides})
    store = Store(tmp_path / "m.db")
    run = open_run(store, config, "r", must_exist=False)
    ledger = Ledger(store, "r", Pricing(load_prices(), MINI), max_cost=max_cost)
    try:
        Pipeline(config=config, run=run, store=store, backend=backend, workdir=tmp_path / "w",
                 console=Console(quiet=True), show_progress=False, poll_interval=0, ledger=ledger).run()
    finally:
        store.close()
    return Store(tmp_path / "m.db")


def test_every_response_and_job_has_one_ledger_line(tmp_path):
    backend = BilledBackend()
    store = run_priced(tmp_path, backend)
    usage = store.get_usage("r")
    chat = [u for u in usage if u.billing == "standard"]
    training = [u for u in usage if u.billing == "training"]
    assert len(chat) == len(backend.requests)
    # the rest were asked word for word before (e.g. a summary of the same answers) and cost nothing again
    reused = store.count_responses("r") - len(backend.requests)
    hashes = [h for (h,) in store.db.execute("select request_hash from responses where run_id = 'r'")]
    # each distinct request was asked once; every repeat (here eval-1 summaries identical to eval-0's) was not
    assert reused == len(hashes) - len(set(hashes)) > 0
    assert len(training) == 6 and all(u.estimated == 0 and u.trained_tokens == 100 for u in training)
    assert sum(u.prompt_tokens for u in chat) == sum(len(r.messages[0].content) for r in backend.requests)
    summary = cost_summary(usage)
    assert summary["total_usd"] == pytest.approx(store.total_cost("r")) and summary["total_usd"] > 0
    for key in ("by_stage", "by_iteration", "by_agent", "by_role"):
        assert sum(g["cost_usd"] for g in summary[f"by_{key[3:]}"]) == pytest.approx(summary["total_usd"])
    assert {g["stage"] for g in summary["by_stage"]} == {"debate", "evaluation", "training"}
    assert {g["role"] for g in summary["by_role"]} == {"generator", "critic", "summarizer"}
    # finetuned agents are priced at the finetuned rate of their root base model, known from the run's jobs
    ft_line = next(u for u in chat if u.model.startswith("ft(") and u.cached_tokens == 0)
    assert "openai.com" in ft_line.price_source
    assert ft_line.cost_usd == pytest.approx((ft_line.prompt_tokens * 0.80 + ft_line.completion_tokens * 3.20) / 1e6)


def test_finetuned_ids_of_any_provider_are_priced_from_their_root_base_model():
    pricing = Pricing(load_prices(), "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference")
    pricing.learn("me/llama-8b-it1", "base")
    pricing.learn("me/llama-8b-it2", "me/llama-8b-it1")
    assert pricing.chat("me/llama-8b-it2", 10**6, 0, 0) == pytest.approx(0.18)
    assert pricing.training("me/llama-8b-it1", 10**6) == pytest.approx(0.48)
    full = Pricing(load_prices(), "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", full_finetune=True)
    assert full.training("base", 10**6) == pytest.approx(0.54)


def test_the_budget_stops_before_overspending_and_the_run_resumes(tmp_path):
    with pytest.raises(RunStopped, match="budget"):
        run_priced(tmp_path, BilledBackend(), max_cost=0.0001)
    store = Store(tmp_path / "m.db")
    spent = store.total_cost("r")
    assert spent <= 0.0001
    assert store.get_run("r").status == "failed"
    store.close()
    backend = BilledBackend()
    store = run_priced(tmp_path, backend, max_cost=100.0)
    assert store.get_run("r").status == "finished"


def test_the_dry_run_counts_exactly_the_calls_a_run_makes(tmp_path):
    config = RunConfig(train_size=12, eval_size=5, iterations=2)
    info = BilledBackend().describe()
    lines = estimate_run(config, get_task(config.task), Pricing(load_prices(), MINI), info)
    backend = BilledBackend()
    store = run_priced(tmp_path, backend, iterations=2)
    # every response of the run: asked of the provider, or identical to an earlier one and answered from the store
    assert sum(line.calls for line in lines) == store.count_responses("r") >= len(backend.requests)
    stages = {(line.iteration, line.stage) for line in lines}
    assert stages == {(0, "evaluation"), (1, "debate"), (1, "training"), (1, "evaluation"), (2, "debate"),
                      (2, "training"), (2, "evaluation")}
    for line in lines:
        assert 0 < line.expected_usd < line.at_most_usd


def test_the_dry_run_adds_every_baseline_asked_for():
    config = RunConfig(train_size=12, eval_size=5, iterations=2)
    info = BilledBackend().describe()
    pricing = Pricing(load_prices(), MINI)
    plain = estimate_run(config, get_task(config.task), pricing, info)
    more = estimate_run(config, get_task(config.task), pricing, info, ("star", "single-ft"))
    extra = [line for line in more if "·" in line.stage]
    assert {line.stage.split(" · ")[0] for line in extra} == {"star", "single-ft"}
    assert len(more) > len(plain) and sum(e.at_most_usd for e in more) > sum(e.at_most_usd for e in plain)
    # single-agent FT trains one model on everything the society trains on; STaR on one generator's share
    society_training = sum(e.trained_tokens for e in plain if e.stage == "training")
    assert sum(e.trained_tokens for e in extra if e.stage == "single-ft · training") == society_training
    assert 0 < sum(e.trained_tokens for e in extra if e.stage == "star · training") < society_training / 3


@pytest.mark.parametrize(("name", "size", "tier", "inference", "lora", "full"), [
    ("meta-llama/Llama-3.2-3B-Instruct", 3, "together up to 4B", 0.10, 0.48, 0.54),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56, "together up to 69B", 0.90, 1.50, 1.65),
    ("Qwen/Qwen2.5-72B-Instruct", 72, "together up to 80B", 0.90, 2.90, 3.20),
    ("mistralai/Mistral-7B-Instruct-v0.2", 7, "together up to 8B", 0.20, 0.48, 0.54),  # 7B, not the v0.2
    ("Qwen/Qwen2.5-1.5B-Instruct", 1.5, "together up to 4B", 0.10, 0.48, 0.54),
    ("google/gemma-2-9b-it", 9, "together up to 16B", 0.30, 0.48, 0.54),
])
def test_together_prices_an_unlisted_model_by_the_size_in_its_name(name, size, tier, inference, lora, full):
    table = load_prices()
    assert model_size_b(name) == size
    found, price = table.lookup(name, "together")
    assert found == tier and price.input == price.output == inference
    assert (price.training, price.training_full) == (lora, full) and "together.ai/pricing" in price.source
    assert table.lookup(name) is None  # size tiers are Together's: no other provider is priced by them
    pricing = Pricing(table, name, family="together")
    assert pricing.missing_price() is None
    assert pricing.chat("base", 10**6, 0, 10**6) == pytest.approx(2 * inference)
    assert pricing.training("base", 10**6) == pytest.approx(lora)
    assert Pricing(table, name, full_finetune=True, family="together").training("base", 10**6) == pytest.approx(full)


def test_a_together_name_without_a_size_stays_unpriced_and_listed_names_win():
    table = load_prices()
    for name in ("acme/mystery-model-v0.2", "deepseek-ai/DeepSeek-V3", "org/model-2024-08-06", "Qwen/Qwen2.5-Instruct"):
        assert model_size_b(name) is None and table.lookup(name, "together") is None
        assert Pricing(table, name, family="together").missing_price() is not None
    assert model_size_b("Qwen/Qwen3-30B-A3B") == 30  # the total, not the active size
    listed = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
    assert table.lookup(listed, "together")[1].input == 0.18  # its own price, not the 8B tier's 0.20
    together = TogetherBackend(listed, TogetherConfig(), MemoryState(), environ={}, dotenv=NO_DOTENV)
    assert together.describe().price_family == "together"


def test_an_unpriced_billed_model_warns_without_a_budget_and_is_refused_with_one(tmp_path):
    info = BackendInfo(name="together", base_model="acme/mystery-model", billed=True, price_family="together")
    out = io.StringIO()
    pricing = run_pricing(info, None, console=Console(file=out, width=60))
    assert pricing.chat("base", 10**6, 0, 10**6) == 0.0
    warning = out.getvalue().strip()
    assert len(warning.splitlines()) == 1 and warning.startswith("warning: no price for model acme/mystery-model")
    assert "counted as $0" in warning and "--prices FILE" in warning
    with pytest.raises(UserError, match=r'--max-cost .*acme/mystery-model.*table 2025-08-01.*--prices FILE.*'
                                        r'\[models."acme/mystery-model"\] input=… output=… training=… source=…'):
        run_pricing(info, None, max_cost=5.0, console=Console(file=io.StringIO()))
    mine = tmp_path / "p.toml"
    mine.write_text('[models."acme/mystery-model"]\ninput = 1\noutput = 2\ntraining = 3\nsource = "my quote"\n')
    out = io.StringIO()
    priced = run_pricing(info, mine, max_cost=5.0, console=Console(file=out))
    assert out.getvalue() == "" and priced.chat("base", 10**6, 10**6, 10**6) == pytest.approx(3.0)  # cached = input


def _openai_info(model: str, **settings) -> BackendInfo:
    return OpenAIBackend(model, OpenAIConfig(**settings), MemoryState(), show_progress=False, environ={},
                         dotenv=NO_DOTENV).describe()


def test_billed_auto_bills_a_proxy_serving_a_priced_model_but_not_a_self_hosted_one():
    proxy = "http://gateway.internal:8080/v1"
    assert _openai_info(MINI).billed is True
    assert _openai_info(MINI, api="azure").billed is True
    out = io.StringIO()
    behind_proxy = run_pricing(_openai_info("gpt-4.1-mini", base_url=proxy), None,
                            console=Console(file=out))
    assert behind_proxy.chat("base", 10**6, 0, 0) == pytest.approx(0.40)
    with_budget = run_pricing(_openai_info("gpt-4.1-mini", base_url=proxy), None, max_cost=1.0)
    assert with_budget.table is not None
    vllm = run_pricing(_openai_info("Qwen/Qwen2.5-7B-Instruct", base_url=proxy), None, max_cost=1.0,
                    console=Console(file=out))
    assert vllm.table is None and vllm.chat("base", 10**6, 0, 10**6) == 0.0
    assert out.getvalue() == ""  # nothing billed, so no "unknown price" warning
    # forced either way
    assert run_pricing(_openai_info(MINI, billed=False), None, max_cost=1.0).table is None
    forced = _openai_info("my-finetune-server-model", base_url=proxy, billed=True)
    with pytest.raises(UserError, match="my-finetune-server-model"):
        run_pricing(forced, None, max_cost=1.0)


def test_a_finetune_keeps_its_estimate_beside_its_bill(tmp_path):
    store = run_priced(tmp_path, BilledBackend())
    training = [u for u in store.get_usage("r") if u.billing == "training"]
    assert len(training) == 6
    for line in training:
        assert line.estimated == 0 and line.trained_tokens == 100  # the bill
        assert line.cost_usd == pytest.approx(100 * 5.00 / 1e6)
        assert line.estimated_tokens and line.estimated_tokens != 100  # the estimate from the file, kept
        assert line.estimated_usd == pytest.approx(line.estimated_tokens * 5.00 / 1e6)
    summary = cost_summary(store.get_usage("r"))["training"]
    assert summary == {
        "jobs": 6, "billed_jobs": 6, "billed_tokens": 600, "billed_usd": pytest.approx(600 * 5.00 / 1e6),
        "estimated_tokens": sum(u.estimated_tokens for u in training),
        "estimated_usd": pytest.approx(sum(u.estimated_usd for u in training)),
    }
    tables = cost_tables(cost_summary(store.get_usage("r")), "r")
    assert "estimated before each job vs billed" in str(tables[-1].title)
    store.close()


def test_the_evaluations_of_baselines_ablations_and_transfer_are_filed_under_evaluation(tmp_path):
    config = RunConfig(train_size=6, eval_size=4, iterations=1)
    store = Store(tmp_path / "m.db")
    run = open_run(store, config, "r", must_exist=False)
    ledger = Ledger(store, "r", Pricing(load_prices(), MINI))
    pipeline = Pipeline(config=config, run=run, store=store, backend=BilledBackend(), workdir=tmp_path / "w",
                        console=Console(quiet=True), show_progress=False, poll_interval=0, ledger=ledger)
    try:
        pipeline.run(baselines=["star", "no-critic"])
        pipeline.run_more(transfer=["arithmetic:medium"])
        usage = store.get_usage("r")
    finally:
        store.close()
    chat = [u for u in usage if u.debate]
    debates = {u.debate for u in chat}
    assert {"eval-1", "star/eval-1", "no-critic/eval-1", "transfer/arithmetic:medium/eval-0",
            "transfer/arithmetic:medium/star/eval-1", "train-1", "star/rationale-1"} <= debates
    evaluations = {u.debate for u in chat if u.stage == "evaluation"}
    assert evaluations == {d for d in debates if d.rsplit("/", 1)[-1].startswith("eval-")}
    by_stage = {g["stage"]: g["cost_usd"] for g in cost_summary(usage)["by_stage"]}
    assert by_stage["evaluation"] == pytest.approx(sum(u.cost_usd for u in chat if u.debate in evaluations))
    assert by_stage["debate"] == pytest.approx(sum(u.cost_usd for u in chat if u.debate not in evaluations))

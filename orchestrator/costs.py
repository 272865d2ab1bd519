"""Prices, the cost ledger and the budget.

Every paid call and every finetune appends a line to the `usage` table with its tokens, its cost and the price
source, the moment it happens; `orchestrator cost` only sums that ledger. The budget (`--max-cost`) is checked
before each step with an upper-bound estimate, so a run stops *before* it would overspend, never after.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from rich.console import Console

from backends.base import BASE_MODEL_ID, BackendInfo, ChatRequest, ChatResult, EmbeddingResult, FinetuneSpec
from foundation.errors import RunStopped, UserError
from orchestrator.names import DebateName, attempt_key
from orchestrator.store import JobRow, ResponseRow, Store, UsageRow

ESTIMATE_CHARS_PER_TOKEN = 4  # for estimates and the budget's upper bounds only; bills use the provider's counts
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per chat message
PROVIDER_BILL = "the provider's bill for the job"  # price_source of a training line the provider priced itself


class ModelPrice(BaseModel):
    """US dollars per 1M tokens for one base model and its finetuned variant."""

    family: str | None = None  # the provider charging these (BackendInfo.price_family); none: whichever serves it
    aliases: list[str] = Field(default_factory=list)
    input: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)  # none: cached prompt tokens cost the same as the rest
    output: float = Field(ge=0)
    training: float = Field(0.0, ge=0)  # LoRA where the provider distinguishes
    training_full: float | None = Field(None, ge=0)
    # preference (DPO) training tokens, where the provider prices them apart; none: at `training` / `training_full`
    training_dpo: float | None = Field(None, ge=0)
    training_dpo_full: float | None = Field(None, ge=0)
    ft_input: float | None = Field(None, ge=0)
    ft_cached_input: float | None = Field(None, ge=0)
    ft_output: float | None = Field(None, ge=0)
    source: str


class SizeTier(BaseModel):
    """A provider's price for every model of a size: sizes above the previous tier's bound, up to `up_to_b`."""

    up_to_b: float = Field(gt=0)  # billions of parameters, inclusive
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    training: float | None = Field(None, ge=0)  # LoRA; none: the provider does not finetune models this large
    training_full: float | None = Field(None, ge=0)
    training_dpo: float | None = Field(None, ge=0)  # DPO, LoRA and full; none: at the SFT rates
    training_dpo_full: float | None = Field(None, ge=0)
    source: str


# A size in a model's name: `8B`, `70b`, `1.5B`, or a mixture of experts `8x7B`; never part of a version
# (`v0.2`, `Qwen2.5`) or of a longer word (`A3B` in `Qwen3-30B-A3B` is the active size).
_SIZE = re.compile(r"(?<![A-Za-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)[bB](?![A-Za-z0-9])")


def model_size_b(model: str) -> float | None:
    """Billions of parameters as the name says (`Mixtral-8x7B` = 56), the largest if it says several."""
    sizes = [float(n or 1) * float(b) for n, b in _SIZE.findall(model.rsplit("/", 1)[-1])]
    return max(sizes) if sizes else None


class PriceTable(BaseModel):
    version: str
    batch_discount: float = Field(0.5, ge=0, le=1)
    models: dict[str, ModelPrice]
    tiers: dict[str, list[SizeTier]] = Field(default_factory=dict)  # by price family (BackendInfo.price_family)

    def lookup(self, model: str, family: str | None = None) -> tuple[str, ModelPrice] | None:
        """The entry for a model name, by exact name, alias, or dated snapshot (`gpt-4.1-mini-2025-…`); else,
        for a provider that prices by size, the tier of the size in the model's name. With a `family` (the
        provider serving it), only entries for that provider or for none count: Together's price of a Qwen model
        says nothing about a vLLM server of it."""
        models = {name: price for name, price in self.models.items()
                  if family is None or price.family in (None, family)}
        if model in models:
            return model, models[model]
        for name, price in models.items():
            if model in price.aliases:
                return name, price
        for name, price in models.items():  # another dated snapshot of a known alias
            if any(re.fullmatch(rf"{re.escape(alias)}-(\d{{4}}-\d{{2}}-\d{{2}}|\d{{4}})", model)
                   for alias in price.aliases):
                return name, price
        return self._tier(model, family) if family else None

    def _tier(self, model: str, family: str) -> tuple[str, ModelPrice] | None:
        size = model_size_b(model)
        if size is None:
            return None
        for tier in sorted(self.tiers.get(family, []), key=lambda t: t.up_to_b):
            if size <= tier.up_to_b:
                price = ModelPrice(input=tier.input, output=tier.output, training=tier.training or 0.0,
                                   training_full=tier.training_full, training_dpo=tier.training_dpo,
                                   training_dpo_full=tier.training_dpo_full,
                                   source=f"{tier.source}; {size:g}B by its name")
                return f"{family} up to {tier.up_to_b:g}B", price
        return None


def load_prices(user_file: Path | None = None) -> PriceTable:
    """The packaged table, with a user's entries (a file of the same shape) replacing it model by model."""
    data = tomllib.loads(resources.files("orchestrator").joinpath("prices.toml").read_text(encoding="utf-8"))
    path = user_file or (Path(os.environ["MAFT_PRICES"]) if os.environ.get("MAFT_PRICES") else None)
    if path is not None:
        if not path.is_file():
            raise UserError(f"price file {path} does not exist: check --prices or MAFT_PRICES")
        try:
            extra = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"price file {path} is not valid TOML: {exc}; fix that line") from None
        data["models"] = {**data["models"], **extra.get("models", {})}
        data["tiers"] = {**data.get("tiers", {}), **extra.get("tiers", {})}  # a family's tiers, all replaced
        data["version"] = f"{data['version']}+{path.name}"
        if "batch_discount" in extra:
            data["batch_discount"] = extra["batch_discount"]
    try:
        return PriceTable.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"price file entry '{where}' is invalid: {first['msg']}; fix it in {path}") from None


def split_model_id(model_id: str) -> tuple[str, bool]:
    """`ft:gpt-4.1-mini-2025-04-14:org:suffix:id` -> ("gpt-4.1-mini-2025-04-14", True)."""
    if model_id.startswith("ft:"):
        return model_id.split(":")[1], True
    return model_id, False


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / ESTIMATE_CHARS_PER_TOKEN)


def finetune_tokens(spec: FinetuneSpec, epochs: int) -> tuple[int, int]:
    """Estimated trained tokens of a finetune, and how many of them are its DPO stage's: the SFT file ("sft"),
    the pair file ("dpo"), or both ("sft-then-dpo"), each `epochs` times."""

    def tokens(path: Path | None) -> int:
        return 0 if path is None else estimate_tokens(path.read_text(encoding="utf-8")) * epochs

    sft = tokens(spec.training_file) if spec.objective != "dpo" else 0
    dpo = tokens(spec.preference_file) if spec.objective != "sft" else 0
    return sft + dpo, dpo


def request_prompt_tokens(request: ChatRequest) -> int:
    return sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in request.messages)


class Pricing:
    """Turns tokens into dollars for one run's backend; a local backend (no prices) costs nothing.

    A finetuned model is priced from its root base model: OpenAI names it in the id (`ft:BASE:...`); for other
    providers the run's own jobs say which base each finetuned id came from (`learn`).
    """

    def __init__(self, table: PriceTable | None, base_model: str, *, full_finetune: bool = False,
                 family: str | None = None) -> None:
        self.table = table
        self.base_model = base_model
        self.full_finetune = full_finetune
        self.family = family  # the provider whose size tiers price a model not listed by name
        self._roots: dict[str, str] = {}  # finetuned model id -> its root base model

    def missing_price(self, model: str | None = None) -> str | None:
        """Why a billed model (the run's base model by default) cannot be priced; None when it can, or when
        nothing is billed."""
        model = model or self.base_model
        if self.table is None or self.table.lookup(model, self.family) is not None:
            return None
        return f"no price for model {model} in price table {self.table.version}"

    def learn(self, model_id: str, started_from: str) -> None:
        """`model_id` was finetuned from `started_from` (the base model id or an earlier finetuned id)."""
        self._roots[model_id] = self._root(started_from)

    def _root(self, model_id: str) -> str:
        return self.base_model if model_id == BASE_MODEL_ID else self._roots.get(model_id, model_id)

    def _price(self, model_id: str) -> tuple[ModelPrice, bool, str] | None:
        if self.table is None:
            return None
        if model_id in self._roots:
            name, finetuned = self._roots[model_id], True
        else:
            name, finetuned = split_model_id(self._root(model_id))
        found = self.table.lookup(name, self.family)
        if found is None:
            return None
        return found[1], finetuned, found[0]

    def source(self, model_id: str) -> str:
        if self.table is None:
            return "local compute: no per-token price"
        found = self._price(model_id)
        if found is None:
            return f"no price for {model_id} in price table {self.table.version}: counted as 0"
        return f"{found[0].source} (table {self.table.version})"

    def chat(self, model_id: str, prompt: int, cached: int, completion: int, batch: bool = False) -> float:
        found = self._price(model_id)
        if found is None:
            return 0.0
        price, finetuned, _ = found
        rate_in = (price.ft_input if finetuned else None) or price.input
        rate_cached = (price.ft_cached_input if finetuned else None) or price.cached_input
        rate_cached = rate_in if rate_cached is None else rate_cached
        rate_out = (price.ft_output if finetuned else None) or price.output
        cost = ((prompt - cached) * rate_in + cached * rate_cached + completion * rate_out) / 1e6
        return cost * (self.table.batch_discount if batch and self.table else 1.0)

    def training(self, model_id: str, trained_tokens: int, dpo_tokens: int = 0) -> float:
        """Dollars for `trained_tokens` (`dpo_tokens` of them by DPO, at the table's DPO rate where it has one)."""
        found = self._price(model_id)
        if found is None:
            return 0.0
        price = found[0]
        rate = price.training_full if self.full_finetune and price.training_full is not None else price.training
        dpo = price.training_dpo_full if self.full_finetune else price.training_dpo
        dpo_rate = rate if dpo is None else dpo
        dpo_tokens = min(dpo_tokens, trained_tokens)
        return ((trained_tokens - dpo_tokens) * rate + dpo_tokens * dpo_rate) / 1e6

    def embedding(self, model_id: str, prompt_tokens: int) -> float:
        """Embeddings bill their input tokens only (the table's `input`; `output` is 0 for them)."""
        return self.chat(model_id, prompt_tokens, 0, 0)

    def requests_upper_bound(self, requests: Sequence[ChatRequest], batch: bool = False) -> float:
        """What these requests can cost at most: estimated prompts, every answer at max_tokens."""
        return sum(self.chat(r.model, request_prompt_tokens(r), 0, r.max_tokens, batch) for r in requests)


class Ledger:
    """Writes the cost ledger and enforces the budget for one run."""

    def __init__(self, store: Store, run_id: str, pricing: Pricing, max_cost: float | None = None,
                 batch: bool = False) -> None:
        self.store = store
        self.run_id = run_id
        self.pricing = pricing
        self.max_cost = max_cost
        self.batch = batch
        self._dpo_share: dict[str, float] = {}  # attempt key -> the share of its trained tokens trained by DPO
        for job in store.get_jobs(run_id):  # finetuned ids of earlier sessions are priced from their base
            if job.status == "succeeded" and job.model_id:
                pricing.learn(job.model_id, job.base_model_id)

    # budget -----------------------------------------------------------------------------------------------

    def check(self, estimate: float, what: str) -> None:
        """Refuse to start a step whose upper-bound cost would pass the remaining budget."""
        if self.max_cost is None:
            return
        spent = self.store.total_cost(self.run_id)
        if spent + estimate > self.max_cost:
            raise RunStopped(
                f"budget: {what} may cost up to ${estimate:.4f}, and ${spent:.4f} of --max-cost ${self.max_cost:.2f} "
                "is spent; nothing more was started. Raise --max-cost to continue"
            )

    def check_chat(self, requests: Sequence[ChatRequest], what: str) -> None:
        if self.max_cost is not None:
            self.check(self.pricing.requests_upper_bound(requests, self.batch), what)

    def check_training(self, spec: FinetuneSpec, epochs: int, what: str) -> None:
        """Before a job starts: every file it trains on (the SFT file, the pair file, or both in turn under
        sft-then-dpo), estimated, at their rates."""
        if self.max_cost is not None:
            tokens, dpo_tokens = finetune_tokens(spec, epochs)
            self.check(self.pricing.training(spec.base_model, tokens, dpo_tokens), what)

    def check_embedding(self, model: str, texts: Sequence[str], what: str) -> None:
        """Before a provider embeds `texts`: their estimated tokens (1 per 4 characters) at the model's price. A
        billed model the table cannot price is refused under a budget, as a run's own model is at its start."""
        if self.max_cost is None:
            return
        missing = self.pricing.missing_price(model)
        if missing is not None:
            raise RunStopped(
                f"budget: {missing.replace('model', 'embedding model', 1)}, so {what} cannot be held to "
                f"--max-cost; nothing more was started. Add [models.\"{model}\"] with --prices, or set "
                "[diversity] embeddings = \"minilm\""
            )
        self.check(self.pricing.embedding(model, sum(estimate_tokens(t) for t in texts)), what)

    # ledger -----------------------------------------------------------------------------------------------

    def record_embedding(self, result: EmbeddingResult, ref: str, iteration: int | None) -> None:
        """The ledger line of one diversity measurement's provider embeddings (stage "diversity", billing
        "embedding"), by the provider's token count. `ref` names the measurement, so measuring it again
        replaces the line instead of adding one."""
        self.store.record_usage([UsageRow(
            run_id=self.run_id, stage="diversity", iteration=iteration, model=result.model, ref=ref,
            billing="embedding", prompt_tokens=result.prompt_tokens,
            cost_usd=self.pricing.embedding(result.model, result.prompt_tokens),
            price_source=self.pricing.source(result.model),
        )])

    def chat_line(self, row: ResponseRow, result: ChatResult, iteration: int | None) -> UsageRow:
        """The ledger line of one response; the caller stores it with the response, in one transaction."""
        batch = result.billing == "batch"
        u = result.usage
        return UsageRow(
            run_id=self.run_id,
            stage=_stage(row.debate),
            debate=row.debate,
            iteration=iteration,
            agent=row.agent,
            role="summarizer" if row.kind == "summary" else ("generator" if row.round == 1 else "critic"),
            model=row.model_id,
            ref=row.key,
            billing=result.billing,
            prompt_tokens=u.prompt_tokens,
            cached_tokens=u.cached_tokens,
            completion_tokens=u.completion_tokens,
            cost_usd=self.pricing.chat(row.model_id, u.prompt_tokens, u.cached_tokens, u.completion_tokens, batch),
            price_source=self.pricing.source(row.model_id),
        )

    def record_training_estimate(self, job: JobRow, spec: FinetuneSpec, epochs: int) -> None:
        """Before a job runs, the ledger holds its estimate (marked as one); the bill replaces it, keeping the
        estimate in `estimated_tokens` / `estimated_usd` for `orchestrator cost` to compare."""
        tokens, dpo_tokens = self.expect_training(job, spec, epochs)
        self._training_line(job, tokens, estimated=True, dpo_tokens=dpo_tokens)

    def expect_training(self, job: JobRow, spec: FinetuneSpec, epochs: int) -> tuple[int, int]:
        """The estimated trained tokens of a job (this process's start, or one re-attached by a resumed run) and
        the DPO stage's of them, remembered as a share for a bill whose backend does not count the stages
        apart."""
        tokens, dpo_tokens = finetune_tokens(spec, epochs)
        if dpo_tokens:
            self._dpo_share[attempt_key(job.key, job.attempt)] = dpo_tokens / max(1, tokens)
        return tokens, dpo_tokens

    def record_training(self, job: JobRow, dpo_tokens: int | None = None, billed_usd: float | None = None) -> None:
        """The bill of an ended job, from the trained tokens the provider reports (none: nothing billed), its DPO
        stage's `dpo_tokens` at the DPO rate. Where the backend does not count them apart (None), a preference
        job's tokens are split as its files are (`expect_training`). Where the provider says what it charged
        (`billed_usd`: Together's `total_price`), that is the bill, whatever our table's rates say."""
        tokens = job.trained_tokens or 0
        if dpo_tokens is None:
            dpo_tokens = round(tokens * self._dpo_share.get(attempt_key(job.key, job.attempt), 0.0))
        self._training_line(job, tokens, estimated=False, dpo_tokens=dpo_tokens, billed_usd=billed_usd)
        if job.status == "succeeded" and job.model_id:
            self.pricing.learn(job.model_id, job.base_model_id)

    def _training_line(self, job: JobRow, tokens: int, estimated: bool, dpo_tokens: int = 0,
                       billed_usd: float | None = None) -> None:
        cost = self.pricing.training(job.base_model_id, tokens, dpo_tokens) if billed_usd is None else billed_usd
        source = self.pricing.source(job.base_model_id) if billed_usd is None else PROVIDER_BILL
        self.store.record_usage([UsageRow(
            run_id=self.run_id, stage="training", iteration=job.iteration, agent=job.agent, role=job.role,
            model=job.base_model_id, ref=attempt_key(job.key, job.attempt), billing="training", trained_tokens=tokens,
            cost_usd=cost, estimated=int(estimated), price_source=source,
            # the bill leaves these empty, and the store keeps the estimate's
            estimated_tokens=tokens if estimated else None, estimated_usd=cost if estimated else None,
        )])


def _stage(debate: str) -> str:
    """A response's ledger stage: "evaluation" for every society's held-out debates (the base society's, each
    finetuned society's, and zero-shot transfer), "ask" / "solve" for the user's own questions put to a society,
    "debate" for the ones that make training data."""
    name = DebateName.parse(debate)
    if name is not None and name.is_use:
        return name.stage
    return "evaluation" if name is not None and name.is_evaluation else "debate"


def cost_summary(rows: Sequence[UsageRow]) -> dict[str, Any]:
    """Totals by stage, iteration, agent and role, for `orchestrator cost`."""

    def group(key: str) -> list[dict[str, Any]]:
        sums: dict[Any, dict[str, Any]] = {}
        for r in rows:
            k = getattr(r, key)
            s = sums.setdefault(k, {key: k, "cost_usd": 0.0, "prompt_tokens": 0, "cached_tokens": 0,
                                    "completion_tokens": 0, "trained_tokens": 0, "calls": 0})
            s["cost_usd"] += r.cost_usd
            s["prompt_tokens"] += r.prompt_tokens
            s["cached_tokens"] += r.cached_tokens
            s["completion_tokens"] += r.completion_tokens
            s["trained_tokens"] += r.trained_tokens
            s["calls"] += 1
        return sorted(sums.values(), key=lambda s: (s[key] is None, str(s[key])))

    training = [r for r in rows if r.billing == "training"]
    billed = [r for r in training if not r.estimated]
    return {
        "total_usd": sum(r.cost_usd for r in rows),
        "estimated_usd": sum(r.cost_usd for r in rows if r.estimated),
        # finetuning as estimated before each job, and as billed by the jobs that have ended
        "training": {
            "jobs": len(training),
            "estimated_tokens": sum(r.estimated_tokens or 0 for r in training),
            "estimated_usd": sum(r.estimated_usd or 0.0 for r in training),
            "billed_jobs": len(billed),
            "billed_tokens": sum(r.trained_tokens for r in billed),
            "billed_usd": sum(r.cost_usd for r in billed),
        },
        "by_stage": group("stage"),
        "by_iteration": group("iteration"),
        "by_agent": group("agent"),
        "by_role": group("role"),
        "sources": sorted({r.price_source for r in rows if r.price_source}),
    }


def run_pricing(info: BackendInfo, prices: Path | None, *, max_cost: float | None = None,
                console: Console | None = None) -> Pricing:
    """The run's prices. A billed model without a price is refused under --max-cost (its budget could never
    stop anything), else it costs 0 with one warning line."""
    table = load_prices(prices) if info.billed is not False else None
    pricing = Pricing(table, info.base_model, full_finetune=info.full_finetune, family=info.price_family)
    missing = pricing.missing_price()
    if missing is not None and info.billed is None:
        # a server of unknown billing (vLLM, a proxy) serving a model with no price: not billed
        return Pricing(None, info.base_model, full_finetune=info.full_finetune, family=info.price_family)
    if missing is not None:
        entry = f'[models."{info.base_model}"] input=… output=… training=… source=…'
        if max_cost is not None:
            raise UserError(f"--max-cost cannot hold: {missing}; pass --prices FILE with an entry {entry}")
        (console or Console(stderr=True)).print(
            f"warning: {missing}, so its cost is unknown and counted as $0; to price it, pass --prices FILE with an "
            f"entry {entry}", style="yellow", soft_wrap=True, markup=False, highlight=False)
    return pricing

"""The openai backend's settings (`[openai]`): light, so reading a config never imports the SDK."""

from __future__ import annotations

from typing import Literal

from backends.settings import BackendSettings, operational


class OpenAIConfig(BackendSettings):
    """Settings only the openai backend reads (OpenAI, Azure OpenAI, or any OpenAI-compatible server).

    Secrets never live here: the API key comes from OPENAI_API_KEY / AZURE_OPENAI_API_KEY in the environment
    or `.env`. Finetuning hyper-parameters default to the paper's (2 epochs, batch 1, multiplier 1). Where the
    server is and how hard to drive it are operational: a resume may point at another endpoint or change a limit.
    """

    api: Literal["openai", "azure"] = "openai"
    base_url: str | None = operational(None)  # else OPENAI_BASE_URL, else the provider's default
    azure_endpoint: str | None = operational(None)  # else AZURE_OPENAI_ENDPOINT
    api_version: str | None = operational(None)  # Azure only; else OPENAI_API_VERSION
    concurrency: int = operational(16, ge=1, le=1024)
    requests_per_minute: int | None = operational(None, ge=1)
    tokens_per_minute: int | None = operational(None, ge=1)
    max_retries: int = operational(6, ge=0, le=50)  # quick retries of a transient fault, before it is put back
    give_up_after: float = operational(900.0, gt=0)  # seconds the provider may answer nothing before a stage stops
    backoff_initial: float = operational(1.0, gt=0)  # seconds before the first retry (doubling to backoff_max)
    backoff_max: float = operational(60.0, gt=0)  # and between the tries of a request put back
    timeout: float = operational(120.0, gt=0)
    batch: bool = operational(False)  # debate rounds through the Batch API (half price, slower)
    n_epochs: int | Literal["auto"] = 2
    batch_size: int | Literal["auto"] = 1
    learning_rate_multiplier: float | Literal["auto"] = 1.0
    poll_interval: float = operational(30.0, gt=0)
    max_concurrent_jobs: int = operational(6, ge=1, le=256)
    billed: bool | Literal["auto"] = operational(
        "auto", description="Whether calls cost money per token, so --max-cost and --dry-run price them. auto: "
        "yes for api.openai.com and Azure; for any other base URL (a proxy, vLLM, Ollama) exactly when the price "
        "table (or --prices) has the model. true / false force it.")

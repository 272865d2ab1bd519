"""The together backend's settings (`[together]`): light, so reading a config never imports the SDK."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from backends.settings import BackendSettings, operational


class TogetherConfig(BackendSettings):
    """Settings only the together backend reads. The key comes from TOGETHER_API_KEY (environment or `.env`)."""

    base_url: str | None = operational(None)  # else TOGETHER_BASE_URL, else the SDK's default
    concurrency: int = operational(16, ge=1, le=1024)
    requests_per_minute: int | None = operational(None, ge=1)
    tokens_per_minute: int | None = operational(None, ge=1)
    max_retries: int = operational(6, ge=0, le=50)  # as in [openai]
    give_up_after: float = operational(900.0, gt=0)
    backoff_initial: float = operational(1.0, gt=0)
    backoff_max: float = operational(60.0, gt=0)
    timeout: float = operational(120.0, gt=0)
    lora: bool = True  # False: full finetuning (dearer; its models need a dedicated endpoint to answer)
    # True: you will deploy finetuned models on dedicated endpoints when the run stops to ask (needed for full
    # finetuning, whose models Together never serves serverless)
    dedicated_endpoints: bool = operational(False)
    n_epochs: int = Field(2, ge=1, le=100)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    batch_size: int | Literal["max"] = "max"
    lora_r: int = Field(8, ge=1, le=1024)
    lora_alpha: int = Field(16, ge=1, le=4096)
    poll_interval: float = operational(30.0, gt=0)
    max_concurrent_jobs: int = operational(6, ge=1, le=256)

    def problem(self) -> str | None:
        if not self.lora and not self.dedicated_endpoints:
            # Known before anything is paid: every model it trains would stop the next debate until deployed.
            return ("full finetuning on Together ([together] lora = false) makes models that answer only on a "
                    "dedicated endpoint, which this tool does not create: keep lora = true, or set [together] "
                    "dedicated_endpoints = true and deploy each model when the run stops for it")
        return None

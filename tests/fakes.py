"""A scripted in-process backend for fast pipeline tests (the real backends have their own tests).

Its agents answer `a+b` questions right with a probability that grows with each finetune, so a finetuned
society can be told apart from its base; every request and job is recorded for the tests to count.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from backends.base import BASE_MODEL_ID, BackendInfo, ChatRequest, ChatResult, FinetuneSpec, JobRef, JobState, Usage


class Crash(Exception):
    """Stands in for the process dying."""


class ScriptedBackend:
    name = "scripted"

    def __init__(self, *, crash_after: int | None = None, fail_keys: Sequence[str] = ()) -> None:
        self.requests: list[ChatRequest] = []
        self.specs: list[FinetuneSpec] = []
        self.crash_after = crash_after
        self.fail_keys = list(fail_keys)
        self.polls: dict[str, int] = {}

    def describe(self) -> BackendInfo:
        return BackendInfo(name=self.name, base_model="scripted")

    def skill(self, model: str) -> float:
        return 0.45 + 0.2 * model.count("ft(")

    def chat(self, requests, on_result=None) -> list[ChatResult]:
        out = []
        for request in requests:
            if self.crash_after is not None and len(self.requests) >= self.crash_after:
                raise Crash()
            self.requests.append(request)
            first = request.messages[0].content
            match = re.search(r"result of (\d+)\+(\d+)", first)
            if request.model == BASE_MODEL_ID and first.startswith("Here are a list"):
                text = "summary: the others said " + " / ".join(re.findall(r"```(.*?)```", first, re.S))
            elif match:
                value = int(match[1]) + int(match[2])
                rng = random.Random(request.seed)
                right = rng.random() < self.skill(request.model)
                text = f"I think it is {value if right else value + 1 + rng.randrange(3)}."
            else:
                text = "no idea"
            result = ChatResult(key=request.key, text=text, usage=Usage(prompt_tokens=len(first), completion_tokens=5))
            if on_result:
                on_result(result)
            out.append(result)
        return out

    def start_finetune(self, spec: FinetuneSpec) -> JobRef:
        self.specs.append(spec)
        return JobRef(key=spec.key, provider_job_id=f"job-{len(self.specs)}")

    def poll(self, job: JobRef) -> JobState:
        self.polls[job.key] = self.polls.get(job.key, 0) + 1
        spec = next(s for s in reversed(self.specs) if s.key == job.key)
        if self.polls[job.key] == 1:
            return JobState(status="running")
        if any(k in job.key for k in self.fail_keys):
            return JobState(status="failed", error="training file rejected by the scripted provider")
        return JobState(status="succeeded", model_id=f"ft({spec.base_model})-{spec.suffix}", trained_tokens=100,
                        train_loss=0.5)

    def cancel(self, job: JobRef) -> None:
        pass

    def close(self) -> None:
        pass

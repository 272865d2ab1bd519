"""The hosted providers share their glue through the bases in `backends/hosted/`, and play the same roles under
symmetric names: a provider module supplies only what differs, so a fix to the shared flow (retries, the event
cursor, a job gone from the server) is made once."""

from __future__ import annotations

import backends.openai_client as openai_client
import backends.together_client as together_client
from backends.hosted.backend import HostedBackend
from backends.hosted.clients import HostedClients
from backends.hosted.jobs import HostedJobs
from backends.openai import OpenAIBackend
from backends.openai_client import OpenAIClients
from backends.openai_finetune import OpenAIJobs
from backends.together import TogetherBackend
from backends.together_client import TogetherClients
from backends.together_finetune import TogetherJobs

SHARED_BACKEND = {"clients", "client", "chats", "jobs", "retry", "start_finetune", "poll", "cancel"}
SHARED_JOBS = {"_call", "start", "poll", "cancel", "_alive", "_file_exists", "_take_events"}


def test_each_provider_plays_the_same_roles_under_symmetric_names() -> None:
    for backend, clients, jobs in ((OpenAIBackend, OpenAIClients, OpenAIJobs),
                                   (TogetherBackend, TogetherClients, TogetherJobs)):
        assert issubclass(backend, HostedBackend)
        assert issubclass(clients, HostedClients)
        assert issubclass(jobs, HostedJobs)
    assert callable(openai_client.resolve_clients) and callable(together_client.resolve_clients)


def test_the_providers_do_not_repeat_the_shared_glue() -> None:
    for backend in (OpenAIBackend, TogetherBackend):
        assert not SHARED_BACKEND & set(vars(backend)), backend
    for jobs in (OpenAIJobs, TogetherJobs):
        assert not SHARED_JOBS & set(vars(jobs)), jobs
    assert not {"key_error"} & set(vars(OpenAIClients)) and not {"key_error"} & set(vars(TogetherClients))


def test_no_old_names_are_kept() -> None:
    for old in ("ClientFactory", "OpenAIRequestError", "is_retryable", "is_hosted"):
        assert not hasattr(openai_client, old), old
    assert callable(openai_client.is_billed)

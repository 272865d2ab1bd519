"""Fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_openai import FakeOpenAI
from tests.fake_together import FakeTogether
from tests.finished_run import Finished, finished_run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fake_openai(**kwargs): constructor arguments for the fake_openai fixture")
    config.addinivalue_line("markers", "fake_together(**kwargs): constructor arguments for the fake_together fixture")
    config.addinivalue_line("markers", "vllm: needs a real vLLM in .venv-vllm; scripts/test deselects these, "
                            "scripts/test-vllm runs them")


@pytest.fixture
def fake_openai(request: pytest.FixtureRequest) -> Iterator[FakeOpenAI]:
    """A fake OpenAI server on a free port of 127.0.0.1, stopped after the test.

    Configure it per test with `@pytest.mark.fake_openai(finetuning=False, base_accuracy=1.0, ...)`.
    """
    marker = request.node.get_closest_marker("fake_openai")
    with FakeOpenAI(**(marker.kwargs if marker else {})) as fake:
        yield fake


@pytest.fixture
def fake_together(request: pytest.FixtureRequest) -> Iterator[FakeTogether]:
    """A fake Together AI server on a free port of 127.0.0.1, stopped after the test.

    Configure it per test with `@pytest.mark.fake_together(job_polls_per_state=2, base_accuracy=1.0, ...)`; use it
    as `together.Together(base_url=fake_together.base_url, api_key=fake_together.api_key)`.
    """
    marker = request.node.get_closest_marker("fake_together")
    with FakeTogether(**(marker.kwargs if marker else {})) as fake:
        yield fake


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """One finished openai run on the fake server, made once for test_use and test_serve (each test copies its
    database with `finished.copy(tmp_path)`)."""
    yield from finished_run(tmp_path_factory.mktemp("finished"))

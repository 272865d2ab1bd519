"""Progress-bar pieces of our own: what rich's stock columns cannot show."""

from __future__ import annotations

from rich.progress import ProgressColumn, Task
from rich.text import Text

from backends.base import ReportsRetries


class RetryColumn(ProgressColumn):
    """The backend's retry pressure beside a stage's bar ("retrying 3 · 429s 41 · 5xx 12"), read at each refresh:
    a bar that stalls in a fault storm says why."""

    def __init__(self, backend: ReportsRetries) -> None:
        super().__init__()
        self.backend = backend

    def render(self, task: Task) -> Text:
        return Text(self.backend.retry_pressure(), style="yellow")

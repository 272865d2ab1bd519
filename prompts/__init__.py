"""Prompt templates live as text files beside this loader, so wording changes never touch logic.

Templates use `string.Template` placeholders (`$question`, `$summary`, `$responses`, `$response`) because
the prompts themselves contain LaTeX braces such as `\\boxed{answer}`.
"""

from __future__ import annotations

from importlib import resources
from string import Template


def load(name: str) -> Template:
    """The template `name` (a path relative to this package, e.g. "math/round1.txt")."""
    return Template(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))


def render(name: str, **values: str) -> str:
    """Fill every placeholder; a missing value raises KeyError instead of leaking `$x` into a prompt."""
    return load(name).substitute(**values)

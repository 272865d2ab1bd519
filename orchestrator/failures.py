"""How a command ends when something goes wrong: one line on stderr that names what failed and what to do (with the
resume command when there is one), never a traceback. The traceback goes to a log file that the line names
(`maft-runs/RUN/errors.log`, or `maft-runs/errors.log` for a command about no run), with every secret of the
environment scrubbed; `--debug` or `MAFT_DEBUG=1` lets tracebacks through as Python prints them.

Exit status, as the README's "Failure modes" table has it: 1 stopped and resumable (a provider that stopped
answering, a request refused for good, anything unexpected: what was finished is stored), 2 bad input (a
`UserError`: nothing started or spent), 130 interrupted.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from backends.hosted.env import Scrubber, read_environment
from backends.hosted.errors import HostedRequestError
from foundation.errors import UserError

ERRORS_LOG = "errors.log"
DEBUG_VARIABLE = "MAFT_DEBUG"
# variables whose values are secrets wherever they turn up (OPENAI_API_KEY, TOGETHER_API_KEY, a proxy's token...)
_SECRET_NAME = re.compile(r"(?i)(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)")


@dataclass
class CommandContext:
    """What a command tells its own ending while it runs (click's `obj`): where its log goes and how to resume."""

    debug: bool = False
    log_dir: Path | None = None  # None: ./maft-runs
    resume: str | None = None  # the command that continues the interrupted work

    def at(self, log_dir: Path, resume: str | None = None) -> None:
        self.log_dir = log_dir
        if resume is not None:
            self.resume = resume


def debug_requested(environ: Mapping[str, str]) -> bool:
    return (environ.get(DEBUG_VARIABLE) or "").strip().lower() not in ("", "0", "false", "no")


def secrets_scrubber(environ: Mapping[str, str] | None = None, dotenv: Path | None = None,
                     extra: Iterable[str] = ()) -> Scrubber:
    """A scrubber of every secret-looking variable of the environment and `./.env` and of `extra` (plus
    credential shapes)."""
    try:
        env = read_environment(environ, dotenv)
    except UserError:  # a broken .env: the environment alone
        env = dict(environ if environ is not None else os.environ)
    return Scrubber([*(value for name, value in env.items() if _SECRET_NAME.search(name) and value), *extra])


def argv_secrets(argv: Sequence[str]) -> list[str]:
    """The values of secret-named flags on the command line (`--api-key KEY`, `--api-key=KEY`): the log's
    header repeats the command line, and a key given as a flag is as secret as one in the environment."""
    found = []
    for i, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag.startswith("--") and _SECRET_NAME.search(flag):
            found.append(value if equals else (argv[i + 1] if i + 1 < len(argv) else ""))
    return [v for v in found if v]


def write_log(context: CommandContext, exc: BaseException, argv: list[str], scrubber: Scrubber) -> Path | None:
    """Append the scrubbed traceback to the log; None when it cannot be written (a full disk, a read-only
    folder): the one line is then all there is."""
    folder = context.log_dir or Path("maft-runs")
    path = folder / ERRORS_LOG
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = "".join(traceback.format_exception(exc))
    entry = f"--- {stamp} · orchestrator {' '.join(argv)}\n{text}\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as log:
            log.write(scrubber.scrub(entry))
    except OSError:
        return None
    return path


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def ending(exc: BaseException, context: CommandContext, argv: list[str], scrubber: Scrubber) -> tuple[str, int]:
    """The line to print and the exit status for an exception that ended a command."""
    if isinstance(exc, UserError):
        return f"error: {one_line(scrubber.scrub(str(exc)))}", 2
    if isinstance(exc, KeyboardInterrupt | click.exceptions.Abort):
        then = f"; continue with `{context.resume}`" if context.resume else ""
        return f"interrupted{then}", 130
    log = write_log(context, exc, argv, scrubber)
    where = f" (details in {log})" if log is not None else ""
    then = (f"; everything finished so far is stored: continue with `{context.resume}`" if context.resume
            else "")
    if isinstance(exc, HostedRequestError):
        line = f"stopped: {one_line(scrubber.scrub(str(exc)))}{then}{where}"
        return line, 1
    command = " ".join(["orchestrator", *[a for a in argv if not a.startswith("-")][:1]])
    message = one_line(scrubber.scrub(str(exc))) or "no message"
    trace = f"; the traceback is in {log}" if log is not None else ""
    return (f"error: unexpected {type(exc).__name__} in `{command}`: {message}{then}{trace} (run with --debug to "
            "see it here; please report it)"), 1


def finish(exc: BaseException, context: CommandContext, argv: list[str] | None = None) -> int:
    """Print the line for `exc` on stderr and return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    line, status = ending(exc, context, args, secrets_scrubber(extra=argv_secrets(args)))
    click.echo(line, err=True)
    return status

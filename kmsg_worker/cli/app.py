"""The ``kmsg`` group: options shared by every command, and one way of ending on an error."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from kmsg_worker.errors import ConfigurationError, KmsgError, ValidationError

if TYPE_CHECKING:
    from kmsg_worker.producer import KMsg

__all__ = ["EXIT_CHECK_FAILED", "EXIT_ERROR", "EXIT_USAGE", "KmsgCommand", "KmsgGroup", "cli", "main", "producer"]

#: A check the command runs did not pass (``doctor``, ``messages pending --older-than``).
EXIT_CHECK_FAILED = 1
#: The command line, the input or the configuration is wrong: fix it and run again.
EXIT_USAGE = 2
#: Anything else: a provider, the database or the broker failed, or a wait timed out.
EXIT_ERROR = 3

#: With this variable set, an unexpected error shows its traceback (a bug report needs it).
DEBUG_VARIABLE = "KMSG_DEBUG"


def producer() -> KMsg:
    """The producer the commands use, configured from ``KMSG_*`` (tests may replace this function)."""
    from kmsg_worker.producer import KMsg

    return KMsg()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class KmsgCommand(click.Command):
    """A command that marks the errors it raises with its path (``kmsg messages list``) for the error line."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; an exception leaves knowing which command raised it."""
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not hasattr(exc, "kmsg_command"):
                exc.kmsg_command = ctx.command_path  # type: ignore[attr-defined]
            raise


class KmsgGroup(click.Group):
    """A click group that ends every error with one line on stderr and a documented exit code.

    Click's own handling prints a usage block and exits 2 for usage errors only; a
    :class:`ValidationError` or a storage error from a command would end in a traceback. Here:
    usage, validation and configuration errors exit 2, other known errors 3, an interrupt 130,
    each with one ``kmsg <command>: error: ...`` line. Commands return their exit code.
    """

    command_class = KmsgCommand
    #: Sub-groups (``kmsg messages``, ``kmsg dead``) are of this class too.
    group_class = type

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> int:
        """Run the command line; exit with its code (``standalone_mode``) or return it."""
        code = self._run(list(args) if args is not None else None, prog_name or "kmsg", complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: list[str] | None, prog_name: str, complete_var: str | None, **extra: Any) -> int:
        where = prog_name
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.format_message(), err=True)  # `kmsg` alone: the help, on stderr
            return EXIT_USAGE
        except click.UsageError as exc:
            if exc.ctx is not None:
                where = exc.ctx.command_path
            hint = f" (see '{where} --help')" if exc.ctx is not None else ""
            return _fail(where, exc.format_message() + hint, EXIT_USAGE)
        except click.ClickException as exc:  # a bad file argument and the like
            return _fail(where, exc.format_message(), EXIT_USAGE if exc.exit_code == 2 else EXIT_ERROR)
        except click.Abort:
            return _fail(where, "interrupted", 130)
        except KeyboardInterrupt:
            return _fail(where, "interrupted", 130)
        except (ValidationError, ConfigurationError) as exc:
            return _fail(getattr(exc, "kmsg_command", where), str(exc), EXIT_USAGE)
        except KmsgError as exc:
            return _fail(getattr(exc, "kmsg_command", where), str(exc), EXIT_ERROR)
        except Exception as exc:
            if os.environ.get(DEBUG_VARIABLE):
                raise
            detail = f"{type(exc).__name__}: {exc} (set {DEBUG_VARIABLE}=1 for the traceback)"
            return _fail(getattr(exc, "kmsg_command", where), detail, EXIT_ERROR)
        if result is None:
            return 0
        return int(result)


def _fail(where: str, text: str, code: int) -> int:
    click.echo(f"{where}: error: {_one_line(text)}", err=True)
    return code


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kmsg-worker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=KmsgGroup, context_settings=CONTEXT)
@click.version_option(_version(), "--version", "-V", prog_name="kmsg", message="%(prog)s %(version)s")
def cli() -> None:
    """kmsg-worker: send Korean SMS/LMS/MMS and Kakao AlimTalk through Celery workers.

    Every command reads its settings from KMSG_* environment variables (the embedded SQLite
    database and file broker under ./var when none is set). Data goes to stdout, progress and
    notes to stderr; --json prints JSON instead of tables.

    Exit codes: 0 ok, 1 a check failed, 2 invalid command line, input or configuration,
    3 other errors (provider, database, broker, timeout).
    """
    from kmsg_worker.logging import configure_logging

    configure_logging(os.environ.get("KMSG_LOG_LEVEL", "WARNING"), json_output=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kmsg`` (``argv`` defaults to ``sys.argv[1:]``); returns the exit code."""
    return cli.main(args=argv, prog_name="kmsg", standalone_mode=False)

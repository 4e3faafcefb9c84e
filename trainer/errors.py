"""Errors meant for people: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in what the user gave us (job spec, data, arguments)."""


class SpecError(UserError, ValueError):
    """A job spec field is wrong; `field` is its dotted path (a ValueError so pydantic reports it)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self):  # raised in a worker, it crosses to the driver pickled
        return (self.__class__, (self.field, self.message))


class RunStopped(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM) and did; the message says where it can resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class DataError(UserError):
    """A data file is unusable; the message names the task, file, row and column."""


def first_line(problem: BaseException | str) -> str:
    """The line of an exception (or a message) that says what went wrong, when it comes first."""
    text = str(problem).strip()
    if text:
        return text.splitlines()[0]
    return type(problem).__name__ if isinstance(problem, BaseException) else ""


def last_line(problem: BaseException) -> str:
    """The line of a library's exception that says what went wrong, when it comes last (datasets)."""
    text = str(problem).strip()
    return text.splitlines()[-1] if text else type(problem).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""

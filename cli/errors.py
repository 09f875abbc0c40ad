"""How every `cohort` command reports a mistake the user can fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from cli.terminal import echo_message
from common.errors import CohortInputError


@contextmanager
def input_errors() -> Iterator[None]:
    """One message on stderr naming the problem and its fix, and exit 2; never a traceback."""
    try:
        yield
    except CohortInputError as error:
        echo_message(f"error: {error}")
        raise typer.Exit(code=2) from None

"""How every `cohort` command reports a mistake the user can fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from common.errors import CohortInputError


@contextmanager
def input_errors() -> Iterator[None]:
    """One line on stderr naming the problem and its fix, and exit 2; never a traceback."""
    try:
        yield
    except CohortInputError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None

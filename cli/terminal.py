"""How `cohort` fits its lines to the terminal: 80 columns, a long path or command kept
whole on a line of its own."""

from __future__ import annotations

import os
import re
import sys
import textwrap

import typer

WIDTH = 80
HANGING_INDENT = "  "
COMMAND = re.compile(r"`[^`]+`")
NO_BREAK = "\u00a0"


def output_width() -> int:
    """The width a report on stdout wraps at, as rich's tables do: $COLUMNS, else the
    terminal's, else 80."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit():
        return int(columns)
    return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else WIDTH


def message_width() -> int | None:
    """The width a message wraps at: $COLUMNS, else the terminal's; None when stderr is a
    file or pipe and no width was declared, where a message stays one line, whole for
    grep and log tools."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit():
        return int(columns)
    return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else None


def wrapped(text: str, width: int | None, indent: str = HANGING_INDENT) -> str:
    """text wrapped at width, continuation lines indented by indent; neither a word (a
    path) nor a `command` in backticks is broken, so one longer than the width stands
    whole on a line of its own."""
    if width is None:
        return text
    # textwrap breaks at ASCII whitespace only: a command's spaces become no-break spaces.
    unbroken = COMMAND.sub(lambda command: command.group().replace(" ", NO_BREAK), text)
    lines = textwrap.fill(unbroken, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
    return lines.replace(NO_BREAK, " ")


def paragraph(text: str) -> str:
    """Prose for stdout, wrapped to its width (rich would split a long path across lines)."""
    return wrapped(text, output_width(), indent="")


def echo_message(text: str) -> None:
    """A message on stderr (an error, a warning, how a command ended), wrapped to the terminal."""
    typer.echo(wrapped(text, message_width()), err=True)


def labelled(label: str, value: object) -> str:
    """'label: value' on one line when it fits 80 columns, else the value (a path, a
    fingerprint) whole on a line of its own."""
    line = f"{label}: {value}"
    return line if len(line) <= WIDTH else f"{label}:\n{HANGING_INDENT}{value}"

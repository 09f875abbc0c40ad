"""The line a round prints, in `cohort simulate` and `cohort run` alike."""

from __future__ import annotations

import textwrap

from server.records import RoundRecord

WIDTH = 80
PROBLEM_INDENT = " " * 10


def round_line(record: RoundRecord, rounds: int) -> str:
    """One line under 80 columns; what went wrong, if anything, on lines of its own,
    wrapped to 80 columns however many sites it names."""
    epsilons = [s.epsilon for s in record.sites.values() if s.epsilon is not None]
    privacy = f"eps {max(epsilons):.2f}" if epsilons else "no DP"
    if record.client_level is not None:
        epsilon = record.client_level.epsilon
        privacy = f"client eps {'-' if epsilon is None else f'{epsilon:.2f}'}"
        privacy += "" if record.client_level.released else " held"
    trained = sum(s.trained for s in record.sites.values())
    line = (
        f"round {record.round:>3}/{rounds}  acc {record.accuracy:.3f}  "
        f"loss {record.loss:.3f}  {privacy}  {trained} trained  {record.seconds:.1f}s"
    )
    problems = []
    if record.failures:
        problems.append(f"failed: {', '.join(sorted({f.site for f in record.failures}))}")
    if record.rejected:
        problems.append(f"rejected: {', '.join(sorted({r.site for r in record.rejected}))}")
    if record.refused:
        problems.append(f"refused: {', '.join(record.refused)}")
    problems += list(record.refusal_reasons.values())
    wrapped = [
        textwrap.fill(p, WIDTH, initial_indent=PROBLEM_INDENT, subsequent_indent=PROBLEM_INDENT + "  ")
        for p in problems
    ]
    return "\n".join([line, *wrapped])

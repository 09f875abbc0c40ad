"""What `cohort simulate` prints reads whole in an 80-column terminal or CI log."""

from __future__ import annotations

from cli.main import _round_line
from server.records import CentralRelease, Failure, Rejection, RoundRecord, SiteRound


def _record(**extra: object) -> RoundRecord:
    sites = {f"site-{i}": SiteRound(trained=True, epsilon=7.95) for i in range(5)}
    return RoundRecord(round=50, accuracy=0.9361, loss=0.2113, sites=sites, seconds=123.4, **extra)  # type: ignore[arg-type]


def test_a_round_line_fits_80_columns() -> None:
    line = _round_line(_record(), rounds=100)
    assert len(line) <= 80 and "\n" not in line
    assert line.startswith("round  50/100  acc 0.936") and line.endswith("123.4s")


def test_client_level_rounds_say_whose_epsilon_it_is() -> None:
    line = _round_line(_record(client_level=CentralRelease(released=False, epsilon=3.2)), rounds=10)
    assert "client eps 3.20 held" in line and len(line) <= 80


def test_problems_go_on_their_own_lines() -> None:
    record = _record(
        failures=(Failure(3, "site-3", "train", "no reply within 600s"),),
        rejected=(Rejection(1, "site-1", "train", "NaN"), Rejection(2, "site-2", "train", "NaN")),
        refused=("site-4",),
    )
    first, *problems = _round_line(record, rounds=50).splitlines()
    assert len(first) <= 80
    assert [p.strip() for p in problems] == ["failed: site-3", "rejected: site-1, site-2", "refused: site-4"]

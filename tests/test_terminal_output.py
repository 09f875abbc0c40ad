"""What `cohort simulate` prints reads whole in an 80-column terminal or CI log."""

from __future__ import annotations

from cli.rounds import round_line as _round_line


def _record(**extra: object) -> dict:
    sites = {f"site-{i}": {"epsilon": 7.95, "trained": True} for i in range(5)}
    return {"round": 50, "global": {"accuracy": 0.9361, "loss": 0.2113}, "sites": sites, "failures": [], "seconds": 123.4, **extra}


def test_a_round_line_fits_80_columns() -> None:
    line = _round_line(_record(), rounds=100)
    assert len(line) <= 80 and "\n" not in line
    assert line.startswith("round  50/100  acc 0.936") and line.endswith("123.4s")


def test_client_level_rounds_say_whose_epsilon_it_is() -> None:
    line = _round_line(_record(client_level={"epsilon": 3.2, "released": False}), rounds=10)
    assert "client eps 3.20 held" in line and len(line) <= 80


def test_problems_go_on_their_own_lines() -> None:
    record = _record(failures=[{"site": "site-3"}], rejected=[{"site": "site-1"}, {"site": "site-2"}], refused=["site-4"])
    first, *problems = _round_line(record, rounds=50).splitlines()
    assert len(first) <= 80
    assert [p.strip() for p in problems] == ["failed: site-3", "rejected: site-1, site-2", "refused: site-4"]

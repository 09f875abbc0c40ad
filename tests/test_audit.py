"""`cohort audit`: figures recomputed from the ledgers, warnings, verify, and a page that
renders in a real browser."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import (
    GENESIS_HASH,
    OPTIONAL_FIELDS,
    LedgerRecord,
    RecordKind,
    SiteLedger,
    read_entries,
    verify_chain,
)
from common.privacy.mechanisms import Mechanism

runner = CliRunner()


def _release(round_: int, history: tuple, kind: str = RecordKind.RELEASE, budget: float = 8.0) -> LedgerRecord:
    return LedgerRecord(
        kind=kind,
        run_id=1,
        round=round_,
        site="site-0",
        mechanism=Mechanism.SAMPLE_LEVEL_DP_SGD,
        noise_multiplier=1.2,
        sample_rate=0.25,
        sampling="poisson",
        steps=4,
        clip_norm=1.0,
        delta=1e-5,
        epsilon=PrivacyState(1.2, 0.25, "rdp", history).epsilon(1e-5),
        accountant="rdp",
        budget_epsilon=budget,
        dataset_hash="d",
        model_hash="m",
        config_hash="c",
    )


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    ledger = SiteLedger(tmp_path / "site-0")
    for round_ in range(1, 4):
        ledger.append(_release(round_, ((1.2, 0.25, 4 * round_),)))
    return ledger.state_dir


def _audit(site_dir: Path) -> Path:
    """`cohort audit` of a site, its reports in a folder of their own; returns that folder."""
    out = site_dir.parent / "reports"
    runner.invoke(app, ["audit", str(site_dir), "--out", str(out)])
    return out


def test_audit_recomputes_epsilon_from_the_ledger_under_three_accountants(site_dir: Path) -> None:
    result = runner.invoke(app, ["audit", str(site_dir), "--out", str(site_dir.parent / "reports")])
    assert result.exit_code == 0, result.output
    report = json.loads((site_dir.parent / "reports" / "audit.json").read_text())
    site = report["sites"]["site-0"]
    assert site["epsilon_total"] == pytest.approx(PrivacyState(1.2, 0.25, "rdp", ((1.2, 0.25, 12),)).epsilon(1e-5))
    assert site["accountants"]["pld"] < site["accountants"]["rdp"]
    assert site["chain"] == "verified" and report["warnings"] == []
    assert (site_dir.parent / "reports" / "audit.html").read_text().startswith("<!DOCTYPE html>")


def test_audit_warns_about_training_without_dp_and_a_nearly_spent_budget(tmp_path: Path) -> None:
    ledger = SiteLedger(tmp_path / "site-0")
    ledger.append(_release(1, ((1.2, 0.25, 400),), budget=3.0))
    ledger.append(_release(2, (), kind=RecordKind.NON_PRIVATE, budget=3.0))
    warnings = json.loads((_audit(ledger.state_dir) / "audit.json").read_text())["warnings"]
    assert any("without differential privacy" in w for w in warnings)
    assert any("budget close to exhaustion" in w for w in warnings)


def test_audit_flags_a_broken_chain(site_dir: Path) -> None:
    lines = (site_dir / "privacy_ledger.jsonl").read_text().splitlines()
    (site_dir / "privacy_ledger.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert any(
        "ledger chain broken" in w for w in json.loads((_audit(site_dir) / "audit.json").read_text())["warnings"]
    )


def test_verify_passes_an_intact_ledger(site_dir: Path) -> None:
    result = runner.invoke(
        app, ["audit", "verify", str(site_dir), "--public-key", str(site_dir / "ledger_key.pub.pem")]
    )
    assert result.exit_code == 0 and "3 record(s)" in result.stdout


def test_verify_fails_naming_the_first_edited_record(site_dir: Path) -> None:
    ledger = site_dir / "privacy_ledger.jsonl"
    ledger.write_text(ledger.read_text().replace('"round": 2', '"round": 9'))
    result = runner.invoke(app, ["audit", "verify", str(ledger), "--public-key", str(site_dir / "ledger_key.pub.pem")])
    assert result.exit_code == 1 and "record 2 (round 9" in result.stderr


def test_verify_fails_with_another_sites_key(site_dir: Path, tmp_path: Path) -> None:
    other = SiteLedger(tmp_path / "other")
    result = runner.invoke(app, ["audit", "verify", str(site_dir), "--public-key", str(other.public_key_file)])
    assert result.exit_code == 1 and "record 1" in result.stderr


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("not json at all\n", "record 1 is not a ledger record"),
        ('{"sequence": 0}\n', "record 1 is not a ledger record"),
    ],
)
def test_a_missing_or_malformed_ledger_exits_2_with_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    ledger = tmp_path / "privacy_ledger.jsonl"
    if content is not None:
        ledger.write_text(content)
    key = SiteLedger(tmp_path / "keys").public_key_file
    result = runner.invoke(app, ["audit", "verify", str(ledger), "--public-key", str(key)])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_wrong_key_file_exits_2(site_dir: Path) -> None:
    result = runner.invoke(app, ["audit", "verify", str(site_dir), "--public-key", str(site_dir / "ledger_key.pem")])
    assert result.exit_code == 2 and "not a PEM public key" in result.stderr


def test_a_sites_audit_goes_to_the_current_directory_not_beside_its_key(
    site_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["audit", str(site_dir)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "audit-site-0" / "audit.json").is_file() and not (site_dir / "audit.json").exists()


def test_a_site_that_has_spent_nothing_reports_nothing_spent(tmp_path: Path) -> None:
    state = SiteLedger(tmp_path / "fresh").state_dir
    result = runner.invoke(app, ["audit", str(state), "--out", str(tmp_path / "reports")])
    assert result.exit_code == 0 and "nothing spent" in result.stdout


def _study_record(
    run_id: int, round_: int, history: tuple, granted: float, kind: str = RecordKind.RELEASE
) -> LedgerRecord:
    record = dataclasses.replace(
        _release(round_, history, kind),
        run_id=run_id,
        study_epsilon=granted,
        fab_hash="f" * 64,
        model="cnn",
        coordinator="coordinator.example:9092",
    )
    return (
        record
        if kind == RecordKind.RELEASE
        else dataclasses.replace(record, reason="site site-0 refuses the study: it asks epsilon 5", epsilon=0.0)
    )


def test_audit_lists_every_study_with_its_grant_its_spend_and_the_running_total(tmp_path: Path) -> None:
    ledger = SiteLedger(tmp_path / "site-0")
    first, second = _study_record(11, 1, ((1.2, 0.25, 4),), 1.0), _study_record(33, 1, ((1.2, 0.25, 8),), 1.0)
    for record in (first, _study_record(22, 0, (), 0.0, RecordKind.REFUSAL), second):
        ledger.append(record)
    result = runner.invoke(
        app, ["audit", str(ledger.state_dir), "--out", str(tmp_path / "reports")], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    studies = json.loads((tmp_path / "reports" / "audit.json").read_text())["sites"]["site-0"]["studies"]
    assert [(s["run_id"], s["rounds_trained"], s["rounds_refused"], s["epsilon_granted"]) for s in studies] == [
        (11, 1, 0, 1.0),
        (22, 0, 1, None),
        (33, 1, 0, 1.0),
    ]
    assert studies[2]["epsilon_spent"] == pytest.approx(second.epsilon - first.epsilon) and studies[2][
        "epsilon_total"
    ] == pytest.approx(second.epsilon)
    assert studies[0]["fab_hash"] == "f" * 64 and studies[0]["coordinator"] == "coordinator.example:9092"
    assert "refuses the study: it asks epsilon 5" in " ".join(result.stdout.split())
    assert (
        max(len(line) for line in result.stdout.splitlines() if not line.startswith("/")) <= 80
    )  # a path stands whole on its own line


def test_a_ledger_written_before_studies_were_recorded_still_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    record = {k: v for k, v in dataclasses.asdict(_release(1, ((1.2, 0.25, 4),))).items() if k not in OPTIONAL_FIELDS}
    payload = json.dumps(
        {"sequence": 0, "previous_hash": GENESIS_HASH, "record": record}, sort_keys=True, separators=(",", ":")
    ).encode()
    line = json.dumps(
        {
            "sequence": 0,
            "previous_hash": GENESIS_HASH,
            "record": record,
            "signature": base64.b64encode(key.sign(payload)).decode(),
        }
    )
    (tmp_path / "privacy_ledger.jsonl").write_text(line + "\n")
    assert verify_chain(read_entries(tmp_path / "privacy_ledger.jsonl"), key.public_key()) is None


def test_a_path_without_a_ledger_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 2 and "holds no privacy ledger" in result.stderr


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it when run as root)"
)
def test_audit_page_renders_with_its_plot_in_headless_chromium(site_dir: Path, tmp_path: Path) -> None:
    page = (_audit(site_dir) / "audit.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    shot = tmp_path / "audit.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,1000",
            f"--screenshot={shot}",
            (site_dir.parent / "reports" / "audit.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = Image.open(shot).convert("RGB")
    matplotlib_blue = (31, 119, 180)
    pixels = list(image.get_flattened_data())
    assert (
        sum(1 for p in pixels if all(abs(a - b) < 20 for a, b in zip(p, matplotlib_blue, strict=True))) > 100
    )  # the plotted line is on screen

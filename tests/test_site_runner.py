"""Which code answers at a deployed site: only its installed Cohort, decided from the FAB's
bytes without unpacking or importing it; how `cohort supernode` puts the site's own
`flwr-clientapp` in Flower's way; and what a failure leaves in the site's log."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.common.logger import FLOWER_LOGGER
from flwr.supercore.fab import Fab

from client.site_failure import log_failure, site_reason
from client.site_runner import SITE_PACKAGES, code_refusal
from deploy.launch import SITE_RUNTIME_DIR, SuperNodeLaunch, flower_env, install_site_runner

PYPROJECT = b'[tool.flwr.app.components]\nserverapp = "server.app:app"\nclientapp = "client.app:app"\n'


def _fab(changes: dict[str, bytes]) -> Fab:
    """A FAB of the site's own installed code, with `changes` on top."""
    files = {"pyproject.toml": PYPROJECT, "server/app.py": b"anything the coordinator likes\n"}
    for package, root in SITE_PACKAGES.items():
        files.update({f"{package}/{p.relative_to(root).as_posix()}": p.read_bytes() for p in root.rglob("*.py")})
    files.update(changes)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return Fab(hash_str="f" * 64, content=buffer.getvalue(), verifications={})


def test_a_fab_of_the_sites_own_client_code_is_answered_by_the_installed_code() -> None:
    assert code_refusal(_fab({})) is None


def test_a_fab_with_a_changed_client_module_is_refused_naming_the_file() -> None:
    reason = code_refusal(_fab({"client/privacy_plan.py": b"def refusal_reason(*a): return None\n"}))
    assert reason is not None and "client/privacy_plan.py" in reason


def test_a_fab_that_adds_a_module_to_the_sites_packages_is_refused() -> None:
    reason = code_refusal(_fab({"common/backdoor.py": b"import os\n"}))
    assert reason is not None and "common/backdoor.py" in reason


def test_a_fab_naming_another_clientapp_is_refused() -> None:
    reason = code_refusal(_fab({"pyproject.toml": PYPROJECT.replace(b"client.app:app", b"evil:app")}))
    assert reason is not None and "'evil:app'" in reason


def test_a_fab_that_is_not_a_zip_is_refused() -> None:
    assert "cannot be read" in code_refusal(Fab(hash_str="0" * 64, content=b"not a zip", verifications={}))


def test_cohort_supernode_puts_the_sites_own_flwr_clientapp_first_on_flowers_path(tmp_path: Path) -> None:
    launch = SuperNodeLaunch(
        superlink="127.0.0.1:1", ca_cert=tmp_path / "ca.crt", auth_key=tmp_path / "key", name="site", data=tmp_path,
        state_dir=tmp_path / "state", epsilon=1.0, delta=1e-5, port=1,
    )  # fmt: skip
    fingerprint = launch.prepare()
    install_site_runner(launch.state_dir, tmp_path / "sockets")
    env = flower_env(launch.state_dir / SITE_RUNTIME_DIR)
    found = shutil.which("flwr-clientapp", path=env["PATH"])
    assert found == str(launch.state_dir / SITE_RUNTIME_DIR / "flwr-clientapp") and os.access(found, os.X_OK)
    assert fingerprint.startswith("SHA256:") and "--isolation" in launch.argv()


KEY_STAGE_WITHOUT_TORCH = """
import sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.run import Run
from client.site_runner import answer
from common.secure_aggregation.messages import RECORD, AdvertiseKeys, PublicKeys
from common.secure_aggregation.parameters import SecAggParameters
from tests.test_site_runner import _fab

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
parameters = SecAggParameters(3, 2, 2, 32, 1.0, 6186, 0.0, 3)
message = Message(RecordDict({RECORD: AdvertiseKeys(1, parameters).to_record()}), dst_node_id=5, message_type="train")
config = {"data-path": "/data", "state-dir": sys.argv[1], "epsilon": 1.0, "delta": 1e-5}
context = Context(7, 5, config, RecordDict(), {})
reply = answer(message, context, Run.create_empty(7), _fab({}))
PublicKeys.from_record(reply.content.config_records[RECORD])
print("torch" in sys.modules)
"""


def test_a_deployed_site_answers_secure_aggregations_key_stages_without_loading_its_training_code(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KEY_STAGE_WITHOUT_TORCH, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "PyTorch was loaded to answer a key stage"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    "error,reason",
    [
        (
            ValueError("cannot reshape /data/hospital-a.npz: got (10,)"),
            "ValueError: cannot reshape <local path>: got (10,)",
        ),
        (OSError("~/sites/a/state/ledger.jsonl is not writable"), "OSError: <local path> is not writable"),
        (ValueError("bad file C:\\data\\a.npz"), "ValueError: bad file <local path>"),
        (ValueError("see file:///srv/a.npz, or ./a.npz"), "ValueError: see <local path>, or <local path>"),
        (ValueError("epsilon/delta is 1/2"), "ValueError: epsilon/delta is 1/2"),
        (RuntimeError('line one\n  File "/opt/x.py", line 3'), "RuntimeError: line one"),
    ],
)
def test_what_a_site_sends_for_a_failure_is_one_line_without_local_paths(error: Exception, reason: str) -> None:
    assert site_reason(error) == reason


def test_a_site_failure_is_one_line_in_its_log_and_its_traceback_only_at_debug_level() -> None:
    caught = _Records()
    FLOWER_LOGGER.addHandler(caught)
    try:
        try:
            raise FileNotFoundError("/data/hospital-a.npz")
        except FileNotFoundError as error:
            details = log_failure(error)
    finally:
        FLOWER_LOGGER.removeHandler(caught)
    shown = [r for r in caught.records if r.levelno >= logging.INFO]
    assert [r.getMessage() for r in shown] == ["the site's ClientApp failed: FileNotFoundError: /data/hospital-a.npz"]
    assert shown[0].exc_info is None and details == "FileNotFoundError: <local path>"
    assert [r.levelno for r in caught.records if r.exc_info] == [logging.DEBUG]

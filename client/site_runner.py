"""The site's own `flwr-clientapp`: it runs the site's installed ClientApp, never the FAB's.

Flower 1.42's SuperNode starts `flower-superexec`, which starts one `flwr-clientapp`
process per task, both by name from PATH (flwr.supercore.constant.TASK_TYPE_TO_COMMAND,
flwr.supercore.superexec.executor.subprocess_executor). `cohort supernode` puts a folder
of the site's own first on that PATH, holding a `flwr-clientapp` that runs this module.

It does what flwr.supernode.runtime.run_clientapp does, with Flower's own functions (pull
the task, its run and the FAB; push the reply and the task's status), except for which
code answers the message: never the FAB's.
- the FAB's ClientApp is the site's own Cohort (same `client.app:app` component, and every
  file of `client/` and `common/` byte-identical to what the site installed): the site's
  installed `client.app:app` answers; the FAB is read in memory, never unpacked nor imported;
- anything else: the site refuses with a reply the coordinator can read, records the
  refusal in its ledger, and runs nothing of the FAB.
An evaluation request that the site's policy declines is declined here, before any code
that touches the site's data runs; so are secure aggregation's key stages answered (keys
and shares, nothing of the data), without the site's training code.
"""

from __future__ import annotations

import argparse
import io
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
from flwr.common.constant import SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.telemetry import EventType
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

import client
import common
from client.evaluation_policy import declined_evaluation
from client.ledger_guard import LedgerBehind, check_not_behind, newest_entry, open_site_ledger
from client.policy import SiteConfig
from client.secure_aggregation import is_secure_aggregation, key_stage_reply
from client.site_failure import failure_reply, log_failure
from common import protocol
from common.errors import CohortInputError
from common.flower_logs import readable_flower_logs
from common.privacy.ledger import LedgerRecord, RecordKind, SiteLedger, Spender

# The ClientApp the site runs, as a FAB's pyproject names it.
CLIENT_APP_REFERENCE = "client.app:app"
# The packages the ClientApp imports: their code is what a FAB must not change.
SITE_PACKAGES = {"client": Path(client.__file__).parent, "common": Path(common.__file__).parent}
# The name under which Flower's executor starts a ClientApp process.
FLWR_CLIENTAPP = "flwr-clientapp"


def code_refusal(fab: Fab) -> str | None:
    """Why the site's installed ClientApp must not answer for this FAB, or None when the FAB
    ships exactly the site's own ClientApp code (so running the installed one changes
    nothing the coordinator expects)."""
    try:
        shipped = _read_fab(fab.content)
        project = tomllib.loads(shipped.get("pyproject.toml", b"").decode())
    except (zipfile.BadZipFile, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        return f"its FAB {fab.hash_str[:12]} cannot be read ({type(error).__name__})"
    component = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if component != CLIENT_APP_REFERENCE:
        return f"its FAB {fab.hash_str[:12]} names ClientApp {component!r}, not the site's {CLIENT_APP_REFERENCE}"
    changed = changed_site_files(shipped)
    if changed:
        listed = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        return f"its FAB {fab.hash_str[:12]} ships site code that differs from the site's installed Cohort ({listed})"
    return None


def _installed_code() -> dict[str, bytes]:
    return {
        f"{package}/{path.relative_to(root).as_posix()}": path.read_bytes()
        for package, root in SITE_PACKAGES.items()
        for path in sorted(root.rglob("*.py"))
    }


# The site's code as it was when this process imported it: at a deployed site that is the
# fork server, at the site's start (deploy/clientapp_forkserver.py), so a FAB is compared
# with the code that will answer it, not with files upgraded since.
INSTALLED_CODE = _installed_code()


def changed_site_files(shipped: dict[str, bytes]) -> list[str]:
    """Files of the site's packages that the FAB adds, removes or changes."""
    offered = {
        name: content
        for name, content in shipped.items()
        if name.split("/", 1)[0] in SITE_PACKAGES and name.endswith(".py")
    }
    return sorted(
        name for name in INSTALLED_CODE.keys() | offered.keys() if INSTALLED_CODE.get(name) != offered.get(name)
    )


def _read_fab(content: bytes) -> dict[str, bytes]:
    """The FAB's files, read in memory: nothing of it touches the disk or sys.path."""
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}


def refusal_reply(message: Message, context: Context, site: SiteConfig, fab: Fab, reason: str) -> Message:
    """Record the refusal in the site's ledger and tell the coordinator why."""
    text = f"site {site.name} refuses to run this run's code: {reason}; it runs only its own installed Cohort"
    ledger = open_site_ledger(site)
    try:  # a refusal recorded on a rolled-back ledger would fork it from the coordinator's copy
        check_not_behind(site, ledger, ledger.verified_entries(), newest_entry(message))
    except LedgerBehind as behind:
        print(f"error: {behind}", file=sys.stderr, flush=True)
        return Message(Error(code=protocol.SITE_REFUSED, reason=f"{text}; {behind.reason}"), reply_to=message)
    spender = Spender(
        context.run_id,
        _round_of(message),
        site.name,
        site.delta,
        site.epsilon,
        dataset_hash="",
        config_hash=f"fab:{fab.hash_str}",
    )
    ledger.append(LedgerRecord.refusal(spender, text, _last_epsilon(ledger), site.accountants[0]))
    return Message(Error(code=protocol.SITE_REFUSED, reason=text), reply_to=message)


def _last_epsilon(ledger: SiteLedger) -> float:
    """What the site had spent by its last release (its data is not loaded to refuse code)."""
    releases = [e.record for e in ledger.entries() if e.record.kind == RecordKind.RELEASE]
    return releases[-1].epsilon if releases else 0.0


def _round_of(message: Message) -> int:
    """The round the coordinator says this is (0 when its message names none)."""
    config = message.content.get(protocol.CONFIG) if message.has_content() else None
    return int(protocol.config_number(config, protocol.CONFIG_ROUND, 0)) if isinstance(config, ConfigRecord) else 0


def answer(message: Message, context: Context, run: Run, fab: Fab) -> Message:
    """The reply of whichever code the site's policy lets answer this message."""
    if "data-path" not in context.node_config:
        raise CohortInputError("the site's flwr-clientapp serves deployed sites only; its node config has no data-path")
    site = SiteConfig.deployed_site(context.node_config)
    refusal = code_refusal(fab)
    if refusal is not None:
        print(f"error: refused run {run.run_id}: {refusal}", file=sys.stderr, flush=True)
        return refusal_reply(message, context, site, fab, refusal)
    if message.metadata.message_type == MessageType.EVALUATE:
        declined = declined_evaluation(message, site)
        if declined is not None:
            return declined
    if is_secure_aggregation(message):
        key_stage = key_stage_reply(message, context, site.name)  # keys and shares only: no data, no model
        if key_stage is not None:
            return key_stage
    from client.app import app  # the fork server has it loaded; this module alone needs no PyTorch

    context.node_config = {**context.node_config, protocol.FAB_HASH: fab.hash_str}  # what the site's ledger records
    return app(message=message, context=context)


@dataclass
class _TaskOutcome:
    """What the task reports to the SuperNode when it ends, however it ends."""

    context: Context | None = None
    status: str = SubStatus.FAILED
    details: str = "the site's ClientApp failed"


def run_site_clientapp(
    runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None, parent_pid: int | None
) -> None:
    """One task, start to end, with Flower's own runtime client, heartbeat and exit codes."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry_invoker = make_simple_http_retry_invoker()
    runtime = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=FLWR_CLIENTAPP), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker,
    )
    outcome = _TaskOutcome()
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(runtime))

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        push_task_output(client=runtime, context=outcome.context, sub_status=outcome.status, details=outcome.details)
        if heartbeat.is_running:
            heartbeat.stop()
        runtime.close()

    register_signal_handlers(
        event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.", exit_handlers=[on_exit]
    )
    exit_code = ExitCode.SUCCESS
    message = reply = None
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(runtime)
        outcome.context = context
        reply = answer(message, context, run, fab)
        outcome.status, outcome.details = SubStatus.COMPLETED, ""
    except Exception as error:  # noqa: BLE001 - every failure becomes an error reply, as in Flower's own flwr-clientapp
        outcome.details = log_failure(error)
        if message is not None:
            reply = failure_reply(message, outcome.details)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and outcome.context is not None:
            push_message(runtime, reply, outcome.context)
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def main() -> None:
    """Entry point of the site's `flwr-clientapp`: the arguments Flower's executor passes."""
    parser = argparse.ArgumentParser(description="The site's own ClientApp runner (Cohort)")
    parser.add_argument("--runtime-api-address", dest="runtime_api_address", default=SUPERNODE_DEFAULT_CLIENT_ADDRESS)
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args()
    readable_flower_logs()
    run_site_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=try_obtain_flwr_app_token(args),
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
    )


if __name__ == "__main__":
    main()

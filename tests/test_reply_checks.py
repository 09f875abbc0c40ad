"""Every reply is checked before it counts: one test per rejection reason, on real Flower
Messages and ArrayRecords, with real signed ledger entries from real site ledgers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.differential_privacy import KEY_NORM_BIT
from flwr.supercore.task_identity import TaskIdentity

from common import protocol
from common.config import DPConfig
from common.privacy.ledger import LedgerRecord, RecordKind, SiteLedger, model_hash
from common.privacy.mechanisms import Mechanism
from server.records import Rejection
from server.reply_checks import ReplyChecker, SiteEvaluation, Update
from server.run_config import AggregationConfig, CentralDPConfig, ChecksConfig, RunConfig
from server.site_registry import SiteRegistry

RUN = RunConfig()
RUN_ID = 7
ROUND = 1
GLOBAL = ArrayRecord({"w": Array(np.zeros((4, 3), dtype=np.float32)), "b": Array(np.zeros(3, dtype=np.float32))})


class Site:
    """A simulated site that signs its releases like the ClientApp does."""

    def __init__(self, home: Path, name: str, node: int) -> None:
        self.name, self.node = name, node
        self.ledger = SiteLedger(home / name)

    @property
    def key_pem(self) -> str:
        return self.ledger.public_key_file.read_text()

    def reply(
        self,
        arrays: dict[str, np.ndarray] | None = None,
        *,
        record: dict | None = None,
        site: dict | None = None,
        metrics: dict | None = None,
        server_round: int = ROUND,
        run: RunConfig = RUN,
    ) -> Message:
        sent = ArrayRecord({k: Array(v) for k, v in (arrays or honest_arrays()).items()})
        fields = {
            "kind": RecordKind.RELEASE,
            "run_id": RUN_ID,
            "round": server_round,
            "site": self.name,
            "mechanism": Mechanism.SAMPLE_LEVEL_DP_SGD,
            "noise_multiplier": 1.1,
            "sample_rate": 0.1,
            "sampling": "poisson",
            "steps": 10,
            "clip_norm": 1.0,
            "delta": 1e-5,
            "epsilon": 0.5,
            "accountant": "rdp",
            "budget_epsilon": 8.0,
            "dataset_hash": "d" * 64,
            "model_hash": model_hash(sent),
            "config_hash": run.site_fingerprint(),
        }
        entry = self.ledger.append(LedgerRecord(**{**fields, **(record or {})}))
        site_record = {
            protocol.SITE_NAME: self.name,
            protocol.SITE_LEDGER_ENTRY: entry.to_json(),
            protocol.SITE_LEDGER_KEY: self.key_pem,
            **(site or {}),
        }
        content = RecordDict(
            {
                protocol.ARRAYS: sent,
                protocol.SITE: ConfigRecord(site_record),
                protocol.METRICS: MetricRecord(
                    metrics if metrics is not None else {"num-examples": 100, "train-loss": 0.5, "train-accuracy": 0.8}
                ),
            }
        )
        return Message(content=content, reply_to=instruction(self.node))


def instruction(node: int) -> Message:
    return Message(content=RecordDict(), dst_node_id=node, message_type="train")


def honest_arrays(scale: float = 0.01) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), scale, dtype=np.float32), "b": np.full(3, scale, dtype=np.float32)}


@pytest.fixture(autouse=True)
def serverapp_identity() -> Iterator[None]:
    """What Flower's ServerApp runtime sets before the app makes its first Message."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def registry() -> SiteRegistry:
    return SiteRegistry()


@pytest.fixture
def checker(registry: SiteRegistry) -> ReplyChecker:
    return ReplyChecker(RUN, RUN_ID, registry)


@pytest.fixture
def alice(tmp_path: Path) -> Site:
    return Site(tmp_path, "site-0", node=11)


@pytest.fixture
def bob(tmp_path: Path) -> Site:
    return Site(tmp_path, "site-1", node=22)


LIVE = {11, 22, 33}


def check(checker: ReplyChecker, reply: Message, server_round: int = ROUND) -> Update | Rejection:
    return checker.check_train(server_round, reply, GLOBAL, LIVE)


def rejected(checker: ReplyChecker, reply: Message, reason: str) -> Rejection:
    result = check(checker, reply)
    assert isinstance(result, Rejection), "the reply was accepted"
    assert reason in result.reason, result.reason
    assert "\n" not in result.reason
    return result


def test_an_honest_reply_is_accepted_with_its_spend_from_the_signed_entry(checker: ReplyChecker, alice: Site) -> None:
    update = check(checker, alice.reply(metrics={"num-examples": 100, "epsilon": 0.0001}))
    assert isinstance(update, Update)
    assert update.site == "site-0" and update.norm == pytest.approx(0.01 * np.sqrt(15), rel=1e-5)
    record = update.site_record()
    assert (record.epsilon, record.noise_multiplier, record.sample_rate, record.steps) == (0.5, 1.1, 0.1, 10)


def test_a_reply_without_its_metrics_is_still_accepted(checker: ReplyChecker, alice: Site) -> None:
    update = check(checker, alice.reply(metrics={}))
    assert isinstance(update, Update) and update.reported_examples is None
    assert update.site_record().train_loss is None and update.site_record().trained


def test_under_qfedavg_a_reply_without_its_training_loss_is_rejected(registry: SiteRegistry, alice: Site) -> None:
    run = RunConfig(aggregation=AggregationConfig(strategy="qfedavg"))
    result = ReplyChecker(run, RUN_ID, registry).check_train(
        ROUND, alice.reply(metrics={"num-examples": 100}, run=run), GLOBAL, LIVE
    )
    assert isinstance(result, Rejection) and "q-FedAvg" in result.reason


def test_reply_without_a_site_record_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    reply = Message(
        content=RecordDict({protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in honest_arrays().items()})}),
        reply_to=instruction(alice.node),
    )
    rejected(checker, reply, "no 'site' record")


def test_reply_with_a_name_that_is_no_site_name_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(site={protocol.SITE_NAME: "site-0\nforged line"}), "not a site name")


def test_reply_without_a_ledger_key_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(site={protocol.SITE_LEDGER_KEY: ""}), "no ledger public key")


def test_reply_with_a_key_that_is_not_pem_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(site={protocol.SITE_LEDGER_KEY: "not a key"}), "not PEM")


def test_reply_claiming_a_name_another_node_holds_is_rejected(
    checker: ReplyChecker, alice: Site, tmp_path: Path
) -> None:
    assert isinstance(check(checker, alice.reply()), Update)
    impostor = Site(tmp_path / "elsewhere", "site-0", node=33)
    rejection = rejected(checker, impostor.reply(), "which node 11 holds")
    assert rejection.site == "node 33"


def test_reply_claiming_a_known_name_with_another_key_is_rejected(
    registry: SiteRegistry, alice: Site, tmp_path: Path
) -> None:
    checker = ReplyChecker(RUN, RUN_ID, registry)
    assert isinstance(check(checker, alice.reply()), Update)
    registry.nodes.clear()  # a new run (or a restarted site): node ids are new, names and keys are not
    rejected(checker, Site(tmp_path / "elsewhere", "site-0", node=33).reply(), "not site-0's")


def test_a_node_that_switches_names_is_rejected(checker: ReplyChecker, alice: Site, tmp_path: Path) -> None:
    assert isinstance(check(checker, alice.reply()), Update)
    rejection = rejected(
        checker, Site(tmp_path / "other", "site-9", node=alice.node).reply(), "is site-0 but claims to be site-9"
    )
    assert rejection.site == "site-0"


def test_reply_without_arrays_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    reply = alice.reply()
    reply.content = RecordDict({protocol.SITE: reply.content[protocol.SITE]})
    rejected(checker, reply, "no 'arrays' ArrayRecord")


def test_entry_that_is_not_a_ledger_record_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(site={protocol.SITE_LEDGER_ENTRY: '{"sequence": 0}'}), "not a ledger record")


def test_entry_with_a_field_of_the_wrong_type_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(record={"epsilon": "0.5"}), "epsilon is not a float")


def test_entry_signed_by_another_key_is_rejected(checker: ReplyChecker, alice: Site, tmp_path: Path) -> None:
    forged = Site(tmp_path / "forger", "site-0", node=alice.node).reply()
    forged.content[protocol.SITE][protocol.SITE_LEDGER_KEY] = alice.key_pem
    rejected(checker, forged, "does not verify against site-0's key")


def test_a_replayed_entry_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    first = alice.reply()
    assert isinstance(check(checker, first), Update)
    rejected(checker, first, "not after the 0 it already sent")


def test_an_entry_that_does_not_link_to_the_last_one_sent_is_rejected(
    checker: ReplyChecker, alice: Site, tmp_path: Path
) -> None:
    assert isinstance(check(checker, alice.reply()), Update)
    rewritten = dataclasses.replace(alice.ledger.entries()[0], previous_hash="f" * 64)
    alice.ledger.path.write_text(rewritten.to_json() + "\n")  # the site rewrites the entry it sent
    rejected(checker, alice.reply(server_round=2), "does not link to entry 0")


def test_entry_of_another_site_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(record={"site": "site-1"}), "'site-1''s, not site-0's")


def test_entry_of_another_round_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(server_round=3), "not run 7 round 1")


def test_entry_of_another_mechanism_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(
        checker,
        alice.reply(record={"kind": RecordKind.NON_PRIVATE, "epsilon": 0.0}),
        "this run needs a release by sample-level-dp-sgd",
    )


def test_release_without_noise_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(record={"noise_multiplier": 0.0}), "without noise")


def test_entry_made_under_another_config_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(record={"config_hash": "c" * 64}), "another run config")


def test_entry_whose_model_hash_is_not_of_the_sent_arrays_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply(record={"model_hash": "0" * 64}), "model hash")


def test_missing_array_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply({"w": honest_arrays()["w"]}), "missing ['b']")


def test_extra_array_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply({**honest_arrays(), "x": np.zeros(1, dtype=np.float32)}), "extra ['x']")


def test_array_of_a_shape_numpy_would_broadcast_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(
        checker,
        alice.reply({**honest_arrays(), "b": np.zeros(1, dtype=np.float32)}),
        "sent array b as float32[1], the model has float32[3]",
    )


def test_integer_array_where_a_float_is_expected_is_rejected(checker: ReplyChecker, alice: Site) -> None:
    rejected(checker, alice.reply({**honest_arrays(), "w": np.zeros((4, 3), dtype=np.int64)}), "int64[4, 3]")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_rejected_and_the_spend_is_still_recorded(
    checker: ReplyChecker, alice: Site, bad: float
) -> None:
    arrays = honest_arrays()
    arrays["w"][0, 0] = bad
    rejection = rejected(checker, alice.reply(arrays), "NaN or infinite")
    assert rejection.site == "site-0" and rejection.entry is not None and rejection.entry.record.epsilon == 0.5


def test_array_bytes_that_do_not_decode_are_rejected(checker: ReplyChecker, alice: Site) -> None:
    reply = alice.reply()
    good = reply.content[protocol.ARRAYS]["b"]
    reply.content[protocol.ARRAYS]["b"] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"garbage")
    rejected(checker, reply, "do not decode")


def test_entry_copy_for_the_run_ledger_is_one_line(checker: ReplyChecker, alice: Site) -> None:
    reply = alice.reply()
    spaced = json.dumps(json.loads(reply.content[protocol.SITE][protocol.SITE_LEDGER_ENTRY]), indent=2)
    reply.content[protocol.SITE][protocol.SITE_LEDGER_ENTRY] = spaced
    update = check(checker, reply)
    assert isinstance(update, Update) and "\n" not in update.entry.to_json()


def test_evaluation_reply_claiming_another_sites_name_is_rejected(
    checker: ReplyChecker, alice: Site, bob: Site
) -> None:
    assert isinstance(check(checker, alice.reply()), Update)
    assert isinstance(check(checker, bob.reply()), Update)
    forged = Message(
        content=RecordDict(
            {
                protocol.SITE: ConfigRecord({protocol.SITE_NAME: "site-0"}),
                protocol.METRICS: MetricRecord({"val-accuracy": 1.0}),
            }
        ),
        reply_to=instruction(bob.node),
    )
    result = checker.check_evaluate(forged, LIVE)
    assert isinstance(result, Rejection) and "is site-1 but claims to be site-0" in result.reason


def test_evaluation_reply_without_metrics_is_accepted_without_them(checker: ReplyChecker, alice: Site) -> None:
    assert isinstance(check(checker, alice.reply()), Update)
    reply = Message(
        content=RecordDict({protocol.SITE: ConfigRecord({protocol.SITE_NAME: "site-0"})}),
        reply_to=instruction(alice.node),
    )
    result = checker.check_evaluate(reply, LIVE)
    assert isinstance(result, SiteEvaluation) and result.metrics == {}


def test_registry_survives_a_checkpoint_round_trip(registry: SiteRegistry, alice: Site) -> None:
    assert isinstance(check(ReplyChecker(RUN, RUN_ID, registry), alice.reply()), Update)
    restored = SiteRegistry.from_json(json.loads(json.dumps(registry.to_json())))
    assert restored.to_json() == registry.to_json() and restored.nodes == {}


def test_checks_settings_are_validated() -> None:
    from common.errors import CohortInputError

    with pytest.raises(CohortInputError, match="update-norm-factor"):
        ChecksConfig(update_norm_factor=1.0).validate()
    with pytest.raises(CohortInputError, match="aggregation-weight"):
        RunConfig.from_flower({"aggregation-weight": "claimed"})


def test_client_side_adaptive_clipping_needs_the_sites_clipping_bit(
    registry: SiteRegistry, alice: Site, bob: Site
) -> None:
    run = RunConfig(
        dp=DPConfig(dp_level="client", client_clipping="adaptive"),
        central_dp=CentralDPConfig(clipping_side="client"),
        site_allow_non_private=True,
    )
    checker = ReplyChecker(run, RUN_ID, registry)
    release = {
        "kind": RecordKind.NON_PRIVATE,
        "mechanism": Mechanism.CLIENT_LEVEL_DP_FEDAVG,
        "noise_multiplier": 0.0,
        "epsilon": 0.0,
    }
    without = checker.check_train(ROUND, alice.reply(record=release, run=run, metrics={}), GLOBAL, LIVE)
    assert isinstance(without, Rejection) and "clipping bit" in without.reason
    clipped = checker.check_train(ROUND, bob.reply(record=release, run=run, metrics={KEY_NORM_BIT: 1}), GLOBAL, LIVE)
    assert isinstance(clipped, Update) and clipped.norm_bit == 1

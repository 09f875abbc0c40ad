"""How a run that stopped early reaches Flower's own records as failed, with its reason.

Flower 1.42 records a run as `finished:completed` whenever its ServerApp returns, even when
Cohort stopped it after a round that released nothing (every site refused, too few
updates passed the checks): `flwr ls` and anything that watches Flower would report a
study that did nothing as a success. The only way a ServerApp ends its run as failed is to
raise: Flower then records `finished:failed` with "ServerApp failed with exception:
<reason>" as the status details. Flower logs every such exception with its traceback; a
run that stopped is an outcome, not a fault in the code, so its line carries the reason
instead.
"""

from __future__ import annotations

import logging

from flwr.common.logger import FLOWER_LOGGER


class RunStopped(Exception):
    """The run ended before its last round; the message is why (summary.json's stop_reason)."""


class _ReasonInsteadOfTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RunStopped):
            record.msg, record.args = f"{record.getMessage()}: {record.exc_info[1]}", ()
            record.exc_info = None
        return True


FLOWER_LOGGER.addFilter(_ReasonInsteadOfTraceback())


def end_run(stop_reason: str) -> None:
    """Return for a run that completed; raise RunStopped for one that stopped early, once
    everything it leaves (summary.json included) is written."""
    if stop_reason:
        raise RunStopped(stop_reason)

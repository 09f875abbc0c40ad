"""What a site says when its ClientApp fails: one line of its own, without local paths.

The coordinator sees every failure reason a site sends, and a reason built from an
exception carries whatever the exception held: file paths of the site's data and state
(a wrong-shaped data file: "... /data/hospital-a.npz ..."), or under simulation a Ray
traceback with actor ids. The site sends one line with every path replaced; the whole
exception, traceback included, stays in the site's own log.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from logging import DEBUG, ERROR

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.supercore import log

# An absolute, home-relative or dot-relative path (POSIX or Windows), or a file: URL: a
# slash inside a word (epsilon/delta, 1/2) is not one.
_LOCAL_PATH = re.compile(r"(?<![\w.:/\\])(?:file://|~|\.{1,2})?(?:/|[A-Za-z]:\\)[^\s'\",;:()\[\]]*")
_REASON_CHARS = 300
LOCAL_PATH = "<local path>"


def site_reason(error: BaseException) -> str:
    """The reason a site sends for `error`: its type and first line, no local path in it."""
    first_line = next(iter(str(error).strip().splitlines()), "")
    text = _LOCAL_PATH.sub(LOCAL_PATH, f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__)
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def log_failure(error: BaseException) -> str:
    """Log the failure in the site's own log, whole (the traceback at debug level,
    FLWR_LOG_LEVEL=DEBUG), and return the line the site sends."""
    log(ERROR, "the site's ClientApp failed: %s: %s", type(error).__name__, error)
    log(DEBUG, "the site's ClientApp failed here:", exc_info=error)
    return site_reason(error)


def failure_reply(message: Message, reason: str) -> Message:
    """The error reply for a message the site's ClientApp failed to answer (reason: log_failure's)."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


Handler = Callable[[Message, Context], Message]


def one_line_on_failure(answer: Handler) -> Handler:
    """`answer` (a ClientApp handler), replying with the site's one line when anything
    in it fails, in simulation too (no Ray traceback)."""

    @functools.wraps(answer)
    def answered(msg: Message, context: Context) -> Message:
        try:
            return answer(msg, context)
        except Exception as error:  # noqa: BLE001 - every failure becomes the site's one-line reply
            return failure_reply(msg, log_failure(error))

    return answered

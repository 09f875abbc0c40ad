"""Flower's log lines as Cohort's processes write them: plain text where no terminal
reads them, and each line once.

Flower colours every line it logs (its ConsoleHandler is made with colored=True, and no
setting turns that off), whatever reads them: log files and journals fill with ANSI
codes. And Opacus calls logging.basicConfig when it is imported, which gives the root
logger a handler of its own, so that in every process that imports Opacus (the ServerApp,
the ClientApp) each `flwr` line was printed a second time, with a timestamp.
"""

from __future__ import annotations

from flwr.common.logger import FLOWER_LOGGER, console_handler, update_console_handler


def readable_flower_logs(relayed: bool = False) -> None:
    """Colour only where a terminal shows the lines, and only Flower's own handler prints
    them. relayed: the lines also travel to whoever runs `flwr run --stream` or `flwr log`
    (the ServerApp's do), whose terminal this process cannot see: never coloured."""
    stream = console_handler.stream
    update_console_handler(colored=not relayed and stream is not None and stream.isatty())
    FLOWER_LOGGER.propagate = False

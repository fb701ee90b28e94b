"""Readable logs in an outage: repeated aiokafka records become one line per window with a count.

While a broker is unreachable, aiokafka logs dozens of reconnect errors per second from several
loggers (``aiokafka``, ``aiokafka.conn``, ``aiokafka.consumer.group_coordinator`` ...).
``RepeatSummary`` lets the first record of each kind (logger, level, message template) through,
holds back the repeats that follow within ``window_s``, and lets the first repeat after the window
through with the count appended: ``Unable connect to node with id 1: ... [and 312 more like this in
the last 5.0 s]`` (without its traceback, if any). A count still held back when the records stop
is reported with the next record of that kind.

``install`` puts the filter on the handlers of the root logger rather than on the aiokafka
loggers, so handlers attached to those loggers (``start_kafka_client`` reads aiokafka's last
error from one) still see every record; only what is written out is summarised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

PREFIXES = ("aiokafka",)
MAX_KINDS = 512


class RepeatSummary(logging.Filter):
    """Summarise repeats of records from loggers named by ``prefixes`` (and their children); others pass untouched.

    The record that carries a summary is modified in place (message, arguments, traceback).
    """

    def __init__(self, window_s: float = 5.0, prefixes: Iterable[str] = PREFIXES, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.prefixes = tuple(prefixes)
        self.clock = clock
        self._kinds: dict[tuple[str, int, str], list[float | int]] = {}

    def _applies(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._applies(record.name):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        seen = self._kinds.get(key)
        if seen is None:
            if len(self._kinds) >= MAX_KINDS:
                del self._kinds[next(iter(self._kinds))]
            self._kinds[key] = [now, 0]
            return True
        since, held = seen
        if now - since < self.window_s:
            seen[1] = held + 1
            return False
        seen[0], seen[1] = now, 0
        if held:
            record.msg = f"{record.getMessage()} [and {held} more like this in the last {now - since:.1f} s]"
            record.args = None
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def install(window_s: float = 5.0, handlers: Iterable[logging.Handler] | None = None) -> RepeatSummary:
    """Add one shared ``RepeatSummary`` for aiokafka's loggers to ``handlers`` (default: the root logger's)."""
    summary = RepeatSummary(window_s)
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        handler.addFilter(summary)
    return summary

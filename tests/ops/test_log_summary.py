"""The repeat summariser for aiokafka's logs, on a fake clock."""

from __future__ import annotations

import logging
import sys

from consumer.ops import log_summary
from consumer.ops.log_summary import RepeatSummary


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.ERROR, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def passed(summary: RepeatSummary, *records: logging.LogRecord) -> list[str]:
    return [r.getMessage() for r in records if summary.filter(r)]


def test_first_record_passes_repeats_are_counted_into_one_line_per_window():
    clock = Clock()
    summary = RepeatSummary(window_s=5.0, clock=clock)
    template = "Unable connect to node with id %s: %s"
    out = passed(summary, *(record("aiokafka", template, 1, f"refused {n}") for n in range(300)))
    assert out == ["Unable connect to node with id 1: refused 0"]
    clock.now += 4.9
    assert passed(summary, record("aiokafka", template, 1, "refused 300")) == []
    clock.now += 0.2
    assert passed(summary, record("aiokafka", template, 1, "refused 301")) == [
        "Unable connect to node with id 1: refused 301 [and 300 more like this in the last 5.1 s]"
    ]
    clock.now += 1
    assert passed(summary, record("aiokafka", template, 1, "refused 302")) == []
    clock.now += 10
    assert passed(summary, record("aiokafka", template, 1, "refused 303")) == [
        "Unable connect to node with id 1: refused 303 [and 1 more like this in the last 11.0 s]"
    ]
    clock.now += 6
    assert passed(summary, record("aiokafka", template, 1, "back")) == ["Unable connect to node with id 1: back"], (
        "a quiet window has nothing to add"
    )


def test_kinds_are_logger_level_and_template_and_other_loggers_pass_untouched():
    clock = Clock()
    summary = RepeatSummary(window_s=5.0, clock=clock)
    records = [
        record("aiokafka.conn", "Connection at %s closed", "a"),
        record("aiokafka.conn", "Connection at %s closed", "b"),
        record("aiokafka.consumer.group_coordinator", "Connection at %s closed", "c"),
        record("aiokafka.conn", "Connection at %s closed", "d", level=logging.WARNING),
        record("aiokafka.conn", "Unable to update metadata from %s", [1]),
        record("aiokafkaesque", "Connection at %s closed", "e"),
        record("consumer.kafka.service", "could not %s", "connect"),
        record("consumer.kafka.service", "could not %s", "connect"),
    ]
    assert passed(summary, *records) == [
        "Connection at a closed",
        "Connection at c closed",
        "Connection at d closed",
        "Unable to update metadata from [1]",
        "Connection at e closed",
        "could not connect",
        "could not connect",
    ]


def test_the_summary_line_drops_the_traceback_of_the_record_that_carries_it():
    clock = Clock()
    summary = RepeatSummary(window_s=5.0, clock=clock)
    try:
        raise ConnectionError("reset")
    except ConnectionError:
        exc_info = sys.exc_info()
    first = record("aiokafka", "Heartbeat failed", exc_info=exc_info)
    assert summary.filter(first) and first.exc_info is not None
    assert not summary.filter(record("aiokafka", "Heartbeat failed", exc_info=exc_info))
    clock.now += 5
    later = record("aiokafka", "Heartbeat failed", exc_info=exc_info)
    assert summary.filter(later)
    assert later.exc_info is None and later.getMessage() == "Heartbeat failed [and 1 more like this in the last 5.0 s]"


def test_install_filters_what_is_written_while_aiokafka_handlers_see_every_record():
    """``start_kafka_client`` reads aiokafka's last error through a handler on the ``aiokafka`` logger."""
    written: list[str] = []
    seen: list[str] = []

    class Collect(logging.Handler):
        def __init__(self, into: list[str]) -> None:
            super().__init__()
            self.into = into

        def emit(self, r: logging.LogRecord) -> None:
            self.into.append(r.getMessage())

    output, capture = Collect(written), Collect(seen)
    log_summary.install(handlers=[output])
    root, aiokafka = logging.getLogger(), logging.getLogger("aiokafka")
    root.addHandler(output)
    aiokafka.addHandler(capture)
    try:
        for n in range(50):
            logging.getLogger("aiokafka.conn").error("Unable connect to %s", n)
    finally:
        root.removeHandler(output)
        aiokafka.removeHandler(capture)
    assert written == ["Unable connect to 0"]
    assert len(seen) == 50 and seen[-1] == "Unable connect to 49"

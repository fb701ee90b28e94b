"""Fixtures of the system tests (tests/system/): the fault table the fault-injection modules print."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.system.test_faults import Tally


@pytest.fixture(scope="module")
def fault_table(request):
    """Rows of the summary table, printed when the module finishes."""
    rows: list[Tally] = []
    yield rows
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not rows:
        return
    header = ("fault", "requests sent", "replies", "duplicates", "lost", "dead letters")
    table = [header] + [
        (
            t.fault,
            str(t.sent),
            str(t.replies),
            f"{t.duplicates} ({t.identical} identical, {t.recomputed} recomputed)",
            str(len(t.lost)),
            str(t.dead_letters),
        )
        for t in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("=", "fault injection summary")
        for n, row in enumerate(table):
            reporter.write_line(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
            if n == 0:
                reporter.write_line("-+-".join("-" * w for w in widths))

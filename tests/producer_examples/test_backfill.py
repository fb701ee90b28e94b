"""The backfill CLI (``python -m producer_examples.backfill``): against a real broker, and its in-flight bound and row set.

The broker tests write a generated catalog (JSONL or CSV, PNG images, bad rows at known lines), run the CLI
as a subprocess (no TTY, so no progress bar) and check what the topic, the rejects file, the exit status and
the output say. The in-flight bound is checked in process against a producer that acknowledges at random.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import itertools
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from tqdm import tqdm

from consumer.config.settings import Settings
from devservices import create_topics, free_port
from producer_examples.backfill import Backfill, Checkpoint, RowSet, parse_args, read_rows
from tests.kafka_tools import read_topic_records

DEFAULT_VERSION = 2
MAX_IMAGE_BYTES = 2000
CSV_COLUMNS = ["product_id", "version", "name", "description", "category", "price", "image", "deleted"]


@dataclass
class Catalog:
    """A written input file; ``good`` maps product_id to its expected event, ``bad`` row number to reject code."""

    path: Path
    images: Path
    good: dict[str, dict] = field(default_factory=dict)
    bad: dict[int, str] = field(default_factory=dict)
    rows: list[tuple[int, dict | str]] = field(default_factory=list)


def _png(path: Path, i: int) -> bytes:
    img = Image.new("RGB", (8, 8), (i % 256, (i * 7) % 256, (i * 13) % 256))
    img.putpixel((i % 8, (i // 8) % 8), (255 - i % 256, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _cell(value: object) -> str:
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def make_catalog(tmp: Path, fmt: str, n: int = 300) -> Catalog:
    """``n`` good products (images, text only, deletes; some with their own version) and one bad row of each kind."""
    images = tmp / "images"
    images.mkdir()
    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    noise.save(images / "huge.png")
    assert (images / "huge.png").stat().st_size > MAX_IMAGE_BYTES
    (images / "fake.png").write_text("not a png")
    bad_rows = {
        5: ({"name": "no id", "price": 1.0}, "schema_violation"),
        17: ({"product_id": "bad-price", "name": "cheap", "price": -3.0}, "schema_violation"),
        40: ({"product_id": "bad-missing-image", "name": "ghost", "image": "nowhere.png"}, "image_not_found"),
        61: ({"product_id": "bad-huge-image", "name": "huge", "image": "huge.png"}, "image_too_large"),
        77: ("malformed", "invalid_json" if fmt == "jsonl" else "invalid_row"),
        93: ({"product_id": "bad-blank", "name": "  ", "description": ""}, "schema_violation"),
        120: ({"product_id": "bad-fake-image", "name": "fake", "image": "fake.png"}, "invalid_image"),
    }
    catalog = Catalog(tmp / f"products.{fmt}", images)
    specs: list[dict | str] = []
    bad_at: dict[int, str] = {}
    good_i = 0
    while good_i < n:
        index = len(specs)
        if index in bad_rows:
            row, code = bad_rows[index]
            bad_at[index] = code
            specs.append(row)
            continue
        pid = f"p-{good_i:04d}"
        row: dict = {"product_id": pid, "name": f"Product {good_i}", "description": f"Line one of {good_i}."}
        expected = {"version": DEFAULT_VERSION, "category": None, "price": None, "deleted": False, "image": None}
        if good_i % 25 == 24:
            row = {"product_id": pid, "deleted": True}
            expected |= {"deleted": True, "name": "", "description": ""}
        else:
            if good_i % 3:
                row["category"] = ["apparel", "home", "garden"][good_i % 3]
            if good_i % 4:
                row["price"] = round(good_i * 1.25, 2)
            if good_i % 7:
                row["image"] = f"img-{good_i}.png"
                expected["image"] = _png(images / row["image"], good_i)
            if good_i == 11:
                row["description"] = "spans\ntwo lines"
        if good_i % 5 == 0:
            row["version"] = 7
        expected = {"name": row.get("name", ""), "description": row.get("description", "")} | expected
        expected |= {k: row[k] for k in ("version", "category", "price") if k in row}
        catalog.good[pid] = expected
        specs.append(row)
        good_i += 1

    out = io.StringIO(newline="")
    line = 1
    writer = None
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        line = 2
    for index, spec in enumerate(specs):
        before = out.tell()
        if fmt == "jsonl":
            out.write("{not json,\n" if spec == "malformed" else json.dumps(spec) + "\n")
        elif spec == "malformed":
            writer.writerow(["p-extra", "1", "name", "desc", "", "", "", "", "surplus"])
        else:
            writer.writerow([_cell(spec.get(k)) for k in CSV_COLUMNS])
        if index in bad_at:
            catalog.bad[line] = bad_at[index]
        catalog.rows.append((line, spec))
        line += out.getvalue()[before:].count("\n")
    catalog.path.write_text(out.getvalue())
    return catalog


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


async def backfill(*args: object) -> Result:
    """Run the CLI to completion in a subprocess with a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "MAX_", "PRODUCT_UPDATES"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "producer_examples.backfill",
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return Result(proc.returncode, out.decode(), err.decode())


async def new_topic(broker) -> str:
    topic = f"backfill-{os.urandom(4).hex()}"
    await create_topics(broker.bootstrap, [topic], partitions=3)
    return topic


def common(catalog: Catalog, bootstrap: str, topic: str) -> list[object]:
    """Arguments of every run: the catalog, broker, topic, default version, image limit and a small in-flight bound."""
    return [
        catalog.path,
        "--images",
        catalog.images,
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--version",
        DEFAULT_VERSION,
        "--max-image-bytes",
        MAX_IMAGE_BYTES,
        "--max-in-flight",
        16,
    ]


async def published(broker, topic: str) -> Counter:
    """product_id -> how many records the topic holds for it; checks each record's key and content-type."""
    counts: Counter = Counter()
    for record in await read_topic_records(broker.bootstrap, topic):
        event = json.loads(record.value)
        assert record.key == event["product_id"].encode()
        assert dict(record.headers)["content-type"] == b"application/json"
        counts[event["product_id"]] += 1
    return counts


def rejects(catalog: Catalog) -> dict[int, dict]:
    lines = Path(f"{catalog.path}.rejects.jsonl").read_text().splitlines()
    return {r["row"]: r for r in map(json.loads, lines)}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_every_good_row_is_published_once_and_every_bad_row_rejected(broker, tmp_path, fmt):
    catalog = make_catalog(tmp_path, fmt)
    topic = await new_topic(broker)

    result = await backfill(*common(catalog, broker.bootstrap, topic))

    assert result.code == 2, result
    assert result.stderr == ""
    assert f"published {len(catalog.good)}, skipped 0 (in checkpoint), rejected {len(catalog.bad)}," in result.stdout
    assert len(result.stdout.splitlines()) == 1
    records = await read_topic_records(broker.bootstrap, topic)
    by_id = {}
    for record in records:
        event = json.loads(record.value)
        assert record.key == event["product_id"].encode()
        by_id.setdefault(event["product_id"], []).append(event)
    assert sorted(by_id) == sorted(catalog.good)
    for pid, events in by_id.items():
        assert len(events) == 1, pid
        (event,) = events
        want = catalog.good[pid]
        image = event.pop("image_b64", None)
        assert (base64.b64decode(image) if image else None) == want["image"], pid
        assert event == {"schema_version": 1, "product_id": pid} | {k: v for k, v in want.items() if k != "image" and v is not None}
    got = rejects(catalog)
    assert {row: r["code"] for row, r in got.items()} == catalog.bad
    assert all(r["reason"] for r in got.values())
    specs = dict(catalog.rows)
    for row, r in got.items():
        spec = specs[row]
        assert r["product_id"] == (spec.get("product_id") if isinstance(spec, dict) else None)
    assert "price" in next(r["reason"] for r in got.values() if r["product_id"] == "bad-price")
    assert "nowhere.png" in next(r["reason"] for r in got.values() if r["product_id"] == "bad-missing-image")


async def test_a_run_stopped_by_limit_resumes_without_publishing_a_row_twice(broker, tmp_path):
    catalog = make_catalog(tmp_path, "jsonl")
    topic = await new_topic(broker)
    checkpoint = Path(f"{catalog.path}.checkpoint")
    first_rows = [row for row, _ in catalog.rows[:100]]
    good_first = [row for row in first_rows if row not in catalog.bad]

    first = await backfill(*common(catalog, broker.bootstrap, topic), "--limit", 100, "--checkpoint-every", 10)

    assert first.code == 2, first
    assert f"published {len(good_first)}, skipped 0 (in checkpoint), rejected {sum(r in catalog.bad for r in first_rows)}," in first.stdout
    assert "stopped at --limit 100" in first.stdout
    acked = RowSet(json.loads(checkpoint.read_text())["acked"])
    assert sorted(r for r in first_rows if r in acked) == good_first and len(acked) == len(good_first)
    assert sum((await published(broker, topic)).values()) == len(good_first)

    saved = checkpoint.read_bytes()
    unreachable = await backfill(*common(catalog, f"127.0.0.1:{free_port()}", topic))
    assert unreachable.code == 1, unreachable
    assert unreachable.stdout == ""
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert unreachable.stderr.startswith("backfill: cannot start a Kafka client") and "kept" in unreachable.stderr
    assert checkpoint.read_bytes() == saved

    second = await backfill(*common(catalog, broker.bootstrap, topic))

    assert second.code == 2, second
    remaining = len(catalog.good) - len(good_first)
    assert f"published {remaining}, skipped {len(good_first)} (in checkpoint), rejected {len(catalog.bad)}," in second.stdout
    counts = await published(broker, topic)
    assert sorted(counts) == sorted(catalog.good)
    assert set(counts.values()) == {1}
    assert set(rejects(catalog)) == set(catalog.bad)

    third = await backfill(*common(catalog, broker.bootstrap, topic))
    assert f"published 0, skipped {len(catalog.good)} (in checkpoint)" in third.stdout
    assert sum((await published(broker, topic)).values()) == len(catalog.good)


async def test_a_changed_input_or_target_is_refused_unless_restart(broker, tmp_path):
    catalog = make_catalog(tmp_path, "csv", n=40)
    topic = await new_topic(broker)
    assert (await backfill(*common(catalog, broker.bootstrap, topic), "--limit", 20)).code == 2
    before = sum((await published(broker, topic)).values())

    moved = await backfill(*common(catalog, broker.bootstrap, "elsewhere"))
    assert moved.code == 1, moved
    assert "written for topic" in moved.stderr and "--restart" in moved.stderr

    with catalog.path.open("a") as f:
        f.write("p-new,1,New product,,,,,\n")
    refused = await backfill(*common(catalog, broker.bootstrap, topic))

    assert refused.code == 1, refused
    assert refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "changed since checkpoint" in refused.stderr and "--restart" in refused.stderr
    assert sum((await published(broker, topic)).values()) == before

    restarted = await backfill(*common(catalog, broker.bootstrap, topic), "--restart")

    assert restarted.code == 2, restarted
    assert f"published {len(catalog.good) + 1}, skipped 0 (in checkpoint)" in restarted.stdout
    counts = await published(broker, topic)
    assert counts["p-new"] == 1 and set(catalog.good) <= set(counts)


def test_rowset_keeps_exactly_the_rows_added_as_ranges():
    rng = random.Random(7)
    rows = rng.sample(range(1, 400), 300)
    kept = RowSet()
    for row in rows:
        kept.add(row)
        kept.add(row)
    assert [r for r in range(402) if r in kept] == sorted(rows)
    assert len(kept) == 300
    again = RowSet(kept.ranges())
    assert again.ranges() == kept.ranges()
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(kept.ranges()))
    with pytest.raises(ValueError):
        RowSet([[5, 9], [10, 12]])


class AckingProducer:
    """A stand-in producer that acknowledges one random pending send each time the caller yields to the loop."""

    def __init__(self) -> None:
        self.rng = random.Random(3)
        self.unacked: dict[asyncio.Future, int] = {}
        self.most_events = self.most_bytes = 0
        self.keys: list[bytes] = []
        self.largest = 0

    async def send(self, topic: str, value: bytes, key: bytes, headers: list) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.unacked[future] = len(value)
        self.keys.append(key)
        self.largest = max(self.largest, len(value))
        self.most_events = max(self.most_events, len(self.unacked))
        self.most_bytes = max(self.most_bytes, sum(self.unacked.values()))
        asyncio.get_running_loop().call_soon(self._ack_one)
        return future

    def _ack_one(self) -> None:
        if self.unacked:
            future = self.rng.choice(list(self.unacked))
            del self.unacked[future]
            future.set_result(None)


@pytest.mark.parametrize(("events", "payload_bytes"), [(8, 10**6), (64, 1000)])
async def test_no_more_than_the_in_flight_bounds_wait_for_acknowledgement(tmp_path, events, payload_bytes):
    path = tmp_path / "products.jsonl"
    path.write_text("".join(json.dumps({"product_id": f"p-{i}", "name": f"Product {i}"}) + "\n" for i in range(500)))
    options = parse_args([str(path), "--max-in-flight", str(events), "--max-in-flight-bytes", str(payload_bytes)])
    run = Backfill(options, Settings(_env_file=None))
    checkpoint = Checkpoint(tmp_path / "checkpoint", {}, {})
    producer = AckingProducer()

    with tqdm(disable=True) as bar:
        assert await run.publish(producer, checkpoint, read_rows(path, "jsonl"), bar) is False

    assert len(producer.keys) == 500 and len(checkpoint.acked) == 500 and run.counts.published == 500
    if events == 8:
        assert producer.most_events == 8
    else:
        assert 1000 - producer.largest < producer.most_bytes <= 1000

"""Backfill a catalog: publish a JSONL or CSV file of products, with their images, as ProductUpdated events.

    python -m producer_examples.backfill products.jsonl --images photos/ --bootstrap-servers broker:9092
    clip-search-backfill products.csv --images photos/

Input: one product per JSONL line or CSV record, with the fields product_id, version (default
--version, else 1), name, description, category, price, image (a file name relative to --images)
and deleted; empty or null values count as absent. A row's number is the line it starts on (a CSV
header is line 1).

Contract:

- Every row becomes either one ``schemas.ProductUpdated`` event on --topic, keyed by product_id
  (validated by the schema model and by the service's MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS and
  MAX_MESSAGE_BYTES), or one line in the rejects file: {"row", "product_id" (when known), "code", "reason"}.
- At most --max-in-flight events, and --max-in-flight-bytes of payload, wait for the broker's
  acknowledgement (acks=all) at any time.
- The checkpoint holds the acknowledged rows only, bound to the input's size and SHA-256, the topic
  and the default version; it is written atomically every --checkpoint-every acknowledgements and at
  exit. A rerun skips exactly those rows (rejected rows are examined again). A rerun whose input, topic
  or default version differs is refused unless --restart.
- Exit status: 0 every row published or skipped; 2 some rows rejected; 1 the run could not start or
  finish (bad arguments, input or checkpoint, broker unreachable: one line on stderr, checkpoint kept);
  130 / 143 interrupted by SIGINT / SIGTERM (in-flight events acknowledged and checkpointed first).

Connection security (KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_*, KAFKA_SASL_*) and the limits come from the
same environment variables (or ``.env``) as the service.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from aiokafka.errors import CorruptRecordException, KafkaConnectionError, KafkaError, MessageSizeTooLargeError, RecordListTooLargeError
from PIL import Image
from pydantic import ValidationError
from tqdm import tqdm

from consumer.config.settings import ConfigError, Settings, load_settings
from consumer.domain.errors import StartupError
from consumer.domain.wire import JSON_CONTENT_TYPE, Header
from consumer.kafka.clients import make_producer, start_kafka_client
from schemas import ProductUpdated

FIELDS = ("product_id", "version", "name", "description", "category", "price", "image", "deleted")
CHECKPOINT_FORMAT = 1
EXIT_OK, EXIT_FAILED, EXIT_REJECTED = 0, 1, 2
ROW_REFUSALS = (MessageSizeTooLargeError, RecordListTooLargeError, CorruptRecordException)
"""Broker answers that concern the records of one batch, not the connection: those rows are rejected."""


class BackfillError(Exception):
    """The run cannot start or go on; the message is the one line shown to the user."""


class RowError(Exception):
    """One row cannot be published: ``code`` (short, stable) and ``reason`` (for a person)."""

    def __init__(self, code: str, reason: str, product_id: str | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.product_id = code, reason, product_id


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int
    max_message_bytes: int


class RowSet:
    """A set of row numbers kept as sorted, disjoint, non-adjacent inclusive ranges (compact for runs of rows)."""

    def __init__(self, ranges: list[list[int]] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges or ():
            if not (isinstance(start, int) and isinstance(end, int) and 0 < start <= end):
                raise ValueError(f"bad range {[start, end]}")
            if self._ends and start <= self._ends[-1] + 1:
                raise ValueError("ranges must be sorted, disjoint and not adjacent")
            self._starts.append(start)
            self._ends.append(end)

    def __contains__(self, row: int) -> bool:
        i = bisect.bisect_right(self._starts, row) - 1
        return i >= 0 and row <= self._ends[i]

    def __len__(self) -> int:
        return sum(e - s + 1 for s, e in zip(self._starts, self._ends, strict=True))

    def add(self, row: int) -> None:
        i = bisect.bisect_right(self._starts, row) - 1
        if i >= 0 and row <= self._ends[i]:
            return
        joins_left = i >= 0 and self._ends[i] == row - 1
        joins_right = i + 1 < len(self._starts) and self._starts[i + 1] == row + 1
        if joins_left and joins_right:
            self._ends[i] = self._ends.pop(i + 1)
            del self._starts[i + 1]
        elif joins_left:
            self._ends[i] = row
        elif joins_right:
            self._starts[i + 1] = row
        else:
            self._starts.insert(i + 1, row)
            self._ends.insert(i + 1, row)

    def ranges(self) -> list[list[int]]:
        return [[s, e] for s, e in zip(self._starts, self._ends, strict=True)]


def fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime (ns) and SHA-256 of ``path``; size and hash decide whether a checkpoint still applies."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def _describe(target: object) -> str:
    if isinstance(target, dict):
        return f"topic {target.get('topic')!r} with default version {target.get('default_version')}"
    return repr(target)


class Checkpoint:
    """The acknowledged rows of one input, bound to its content and target, saved atomically (temp file, fsync, rename)."""

    def __init__(self, path: Path, source: dict[str, Any], target: dict[str, Any], acked: RowSet | None = None) -> None:
        self.path, self.source, self.target = path, source, target
        self.acked = acked or RowSet()

    @classmethod
    def open(cls, path: Path, input_path: Path, source: dict[str, Any], target: dict[str, Any], restart: bool) -> Checkpoint:
        """The checkpoint at ``path`` if it matches ``source`` and ``target``, an empty one if absent or ``restart``.

        Raises ``BackfillError`` when the file is unreadable or was written for another input content or target.
        """
        if restart or not path.exists():
            return cls(path, source, target)
        try:
            data = json.loads(path.read_bytes())
            if data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            recorded, acked = data["input"], RowSet(data["acked"])
            recorded_target = data["target"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackfillError(f"checkpoint {path} is unreadable ({exc}): rerun with --restart to publish every row again") from None
        if (recorded.get("size"), recorded.get("sha256")) != (source["size"], source["sha256"]):
            raise BackfillError(
                f"{input_path} changed since checkpoint {path} was written (size {recorded.get('size')} -> {source['size']}, "
                f"sha256 {str(recorded.get('sha256'))[:12]} -> {source['sha256'][:12]}): its row numbers may name other products now; "
                "restore the file, or rerun with --restart to publish every row again"
            )
        if recorded_target != target:
            raise BackfillError(
                f"checkpoint {path} was written for {_describe(recorded_target)}, this run is for {_describe(target)}: rerun with "
                "the same --topic and --version, or with --restart to publish every row again"
            )
        return cls(path, source, target, acked)

    def save(self) -> None:
        data = {"format": CHECKPOINT_FORMAT, "input": self.source, "target": self.target, "acked": self.acked.ranges()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# --- reading rows ---------------------------------------------------------------------------------

Row = tuple[int, dict[str, Any] | RowError]
"""(row number, the row's present fields or why it could not be read)."""


def input_format(path: Path, given: str | None) -> str:
    if given:
        return given
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise BackfillError(f"cannot tell the format of {path} from its suffix: pass --format jsonl or --format csv")


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None and v != ""}


def _unknown(names: Iterable[object]) -> list[str]:
    return sorted(str(n) for n in names if n not in FIELDS)


def read_rows(path: Path, fmt: str) -> Iterator[Row]:
    """Rows of ``path`` in order; a CSV header is checked here, before the first row is asked for.

    Raises ``BackfillError`` for a CSV header without product_id or with unknown columns, and (while
    iterating) for a CSV that is not UTF-8.
    """
    if fmt == "jsonl":
        return _jsonl_rows(path)
    f = path.open(newline="", encoding="utf-8-sig")
    try:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "product_id" not in header:
            raise BackfillError(f"{path}: the CSV header has no product_id column (columns: {', '.join(FIELDS)})")
        if unknown := _unknown(header):
            raise BackfillError(f"{path}: unknown CSV column(s) {', '.join(unknown)} (columns: {', '.join(FIELDS)})")
        if len(set(header)) != len(header):
            raise BackfillError(f"{path}: the CSV header repeats a column")
    except BaseException:
        f.close()
        raise
    return _csv_rows(path, f, reader, header)


def _csv_rows(path: Path, f: io.TextIOBase, reader: Any, header: list[str]) -> Iterator[Row]:
    with f:
        line = reader.line_num
        try:
            for record in reader:
                row, line = line + 1, reader.line_num
                if not record or record == [""]:
                    continue
                if len(record) > len(header):
                    yield row, RowError("invalid_row", f"{len(record)} fields, the header has {len(header)}")
                    continue
                yield row, _present(dict(zip(header, record, strict=False)))
        except UnicodeDecodeError as exc:
            raise BackfillError(f"{path} is not UTF-8 after line {line}: {exc.reason}") from None
        except csv.Error as exc:
            raise BackfillError(f"{path}: unreadable CSV after line {line}: {exc}") from None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for row, line in enumerate(f, start=1):
            if row == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield row, RowError("invalid_json", f"not JSON: {exc}")
                continue
            if not isinstance(fields, dict):
                yield row, RowError("invalid_json", f"a line must be a JSON object, not {type(fields).__name__}")
                continue
            yield row, _present(fields)


def count_rows(path: Path, fmt: str) -> int:
    """How many rows ``read_rows`` yields (for the progress bar's total)."""
    return sum(1 for _ in read_rows(path, fmt))


# --- building events ------------------------------------------------------------------------------


def _schema_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


def _validate(fields: dict[str, Any], product_id: str | None) -> ProductUpdated:
    try:
        return ProductUpdated.model_validate(fields)
    except ValidationError as exc:
        raise RowError("schema_violation", _schema_reason(exc), product_id) from None


def image_b64(images: Path, name: str, limits: Limits, product_id: str) -> str:
    """Base64 of the image file ``images/name`` after checking its size, pixel count and integrity; raises ``RowError``."""
    path = images / name
    if not path.is_file():
        raise RowError("image_not_found", f"no image file {name!r} in {images}", product_id)
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise RowError("image_too_large", f"image {name!r} is {size} bytes, limit {limits.max_image_bytes}", product_id)
    try:
        raw = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                width, height = img.size
                if width * height > limits.max_image_pixels:
                    raise RowError(
                        "image_too_large", f"image {name!r} is {width}x{height} pixels, limit {limits.max_image_pixels}", product_id
                    )
                img.verify()
    except Image.DecompressionBombError as exc:
        raise RowError("image_too_large", f"image {name!r}: {exc}", product_id) from None
    except RowError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a damaged or unknown file
        raise RowError("invalid_image", f"image {name!r} is not a readable image ({type(exc).__name__}: {exc})", product_id) from None
    return base64.b64encode(raw).decode("ascii")


def build_event(fields: dict[str, Any], images: Path, default_version: int, limits: Limits) -> tuple[str, bytes]:
    """(product_id, JSON payload) of the ``ProductUpdated`` a row's fields describe; raises ``RowError``.

    The schema is checked before the image is read; a delete publishes no image.
    """
    pid = fields.get("product_id") if isinstance(fields.get("product_id"), str) else None
    if unknown := _unknown(fields):
        raise RowError("invalid_row", f"unknown field(s) {', '.join(unknown)} (fields: {', '.join(FIELDS)})", pid)
    fields = {"version": default_version} | fields
    image = fields.pop("image", None)
    if image is not None and not isinstance(image, str):
        raise RowError("schema_violation", "image: must be a file name", pid)
    event = _validate(fields | ({"image_b64": "placeholder"} if image else {}), pid)
    if image:
        event = _validate(fields if event.deleted else fields | {"image_b64": image_b64(images, image, limits, event.product_id)}, pid)
    payload = event.model_dump_json(exclude_none=True).encode()
    if len(payload) > limits.max_message_bytes:
        raise RowError("message_too_large", f"the event is {len(payload)} bytes, limit {limits.max_message_bytes}", event.product_id)
    return event.product_id, payload


# --- publishing -----------------------------------------------------------------------------------


@dataclass
class Counts:
    published: int = 0
    skipped: int = 0
    rejected: int = 0


class Backfill:
    """One run: rows -> events -> acknowledged sends, with the checkpoint, rejects file and progress bar it keeps."""

    def __init__(self, options: argparse.Namespace, settings: Settings) -> None:
        self.o = options
        self.settings = settings
        self.topic: str = options.topic or settings.product_updates_topic
        self.default_version: int = options.version if options.version is not None else 1
        self.limits = Limits(options.max_image_bytes or settings.max_image_bytes, settings.max_image_pixels, settings.max_message_bytes)
        self.checkpoint_path: Path = options.checkpoint or Path(f"{options.input}.checkpoint")
        self.rejects_path: Path = options.rejects or Path(f"{options.input}.rejects.jsonl")
        self.images: Path = options.images or options.input.parent
        self.counts = Counts()
        self.stop_signal: int | None = None
        self._pending: dict[asyncio.Future[Any], tuple[int, str, int]] = {}
        self._pending_bytes = 0
        self._since_save = 0
        self._rejects: io.TextIOBase | None = None
        self._fatal: BaseException | None = None

    def prepare(self) -> tuple[Checkpoint, Iterator[Row], int | None]:
        """Check the input, images and checkpoint before any connection; raises ``BackfillError``.

        Returns the checkpoint, the rows and, when the progress bar is shown (stderr a TTY, no --no-progress), their number.
        """
        path: Path = self.o.input
        if not path.is_file():
            raise BackfillError(f"no input file {path}")
        if not self.images.is_dir():
            raise BackfillError(f"--images {self.images} is not a directory")
        fmt = input_format(path, self.o.format)
        target = {"topic": self.topic, "default_version": self.default_version}
        checkpoint = Checkpoint.open(self.checkpoint_path, path, fingerprint(path), target, self.o.restart)
        rows = read_rows(path, fmt)
        return checkpoint, rows, count_rows(path, fmt) if self.o.progress and sys.stderr.isatty() else None

    async def run(self) -> int:
        started = time.monotonic()
        checkpoint, rows, total = self.prepare()
        producer = make_producer(self.settings, client_id="clip-search-backfill", request_timeout_ms=int(self.o.timeout * 1000))
        try:
            await start_kafka_client(self.settings, producer, timeout=self.o.timeout)
            await asyncio.wait_for(producer.partitions_for(self.topic), self.o.timeout)
        except (KafkaConnectionError, StartupError) as exc:
            await producer.stop()
            raise BackfillError(f"{exc.args[0] if exc.args else exc}{self._kept()}") from None
        except (KafkaError, TimeoutError) as exc:
            await producer.stop()
            raise BackfillError(f"topic {self.topic!r} is not available ({type(exc).__name__}){self._kept()}") from None
        self.rejects_path.unlink(missing_ok=True)
        bar = tqdm(total=total, initial=len(checkpoint.acked), unit="row", disable=total is None, dynamic_ncols=True, file=sys.stderr)
        limit_reached = False
        try:
            limit_reached = await self.publish(producer, checkpoint, rows, bar)
        finally:
            checkpoint.save()
            bar.close()
            if self._rejects:
                self._rejects.close()
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(producer.stop(), self.o.timeout if self._fatal is None else 1.0)
        seconds = time.monotonic() - started
        c = self.counts
        line = (
            f"backfill: published {c.published}, skipped {c.skipped} (in checkpoint), rejected {c.rejected}, "
            f"{seconds:.1f} s, {(c.published + c.rejected) / max(seconds, 1e-9):.0f} rows/s"
        )
        if c.rejected:
            line += f"; rejects in {self.rejects_path}"
        if limit_reached:
            line += f"; stopped at --limit {self.o.limit}: rerun to continue"
        if self.stop_signal:
            line += f"; interrupted by {signal.Signals(self.stop_signal).name}: rerun to continue"
        print(line, flush=True)
        if self._fatal is not None:
            raise BackfillError(f"publishing to {self.topic!r} failed ({self._fatal}){self._kept()}: rerun to resume")
        if self.stop_signal:
            return 128 + self.stop_signal
        return EXIT_REJECTED if c.rejected else EXIT_OK

    def _kept(self) -> str:
        return f"; checkpoint {self.checkpoint_path} kept" if self.checkpoint_path.exists() else ""

    async def publish(self, producer: Any, checkpoint: Checkpoint, rows: Iterator[Row], bar: tqdm) -> bool:
        """Send every row not in the checkpoint; True if --limit stopped the run.

        Waits for every send it made, unless publishing failed: sends still pending then are left out of the checkpoint.
        """
        examined = 0
        try:
            for row, fields in rows:
                if self.stop_signal or self._fatal is not None:
                    break
                if row in checkpoint.acked:
                    self.counts.skipped += 1
                    continue
                if self.o.limit is not None and examined >= self.o.limit:
                    return True
                examined += 1
                try:
                    if isinstance(fields, RowError):
                        raise fields
                    pid, payload = build_event(fields, self.images, self.default_version, self.limits)
                except RowError as err:
                    self._reject(row, err, bar)
                    continue
                while self._pending and (
                    len(self._pending) >= self.o.max_in_flight or self._pending_bytes + len(payload) > self.o.max_in_flight_bytes
                ):
                    await self._settle(checkpoint, bar)
                try:
                    future = await producer.send(
                        self.topic, payload, key=pid.encode(), headers=[(Header.CONTENT_TYPE, JSON_CONTENT_TYPE.encode())]
                    )
                except ROW_REFUSALS as exc:
                    self._reject(row, RowError("message_too_large", f"the producer refused the event ({exc})", pid), bar)
                    continue
                except KafkaError as exc:
                    self._fatal = exc
                    break
                self._pending[future] = (row, pid, len(payload))
                self._pending_bytes += len(payload)
            return False
        finally:
            while self._pending and self._fatal is None:
                await self._settle(checkpoint, bar)

    async def _settle(self, checkpoint: Checkpoint, bar: tqdm) -> None:
        """Wait for at least one pending send and account for every finished one."""
        done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            row, pid, size = self._pending.pop(future)
            self._pending_bytes -= size
            exc = future.exception()
            if exc is None:
                checkpoint.acked.add(row)
                self.counts.published += 1
                bar.update()
                self._since_save += 1
                if self._since_save >= self.o.checkpoint_every:
                    checkpoint.save()
                    self._since_save = 0
            elif isinstance(exc, ROW_REFUSALS):
                self._reject(row, RowError("broker_refused", f"the broker refused the batch holding this row ({exc})", pid), bar)
            elif self._fatal is None:
                self._fatal = exc

    def _reject(self, row: int, err: RowError, bar: tqdm) -> None:
        if self._rejects is None:
            self._rejects = self.rejects_path.open("w", buffering=1)
        self._rejects.write(json.dumps({"row": row, "product_id": err.product_id, "code": err.code, "reason": err.reason}) + "\n")
        self.counts.rejected += 1
        bar.update()
        bar.set_postfix(rejected=self.counts.rejected, refresh=False)


# --- command line ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 1, not argparse's 2: 2 means "rows rejected"
        self.print_usage(sys.stderr)
        self.exit(EXIT_FAILED, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="clip-search-backfill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="JSONL or CSV file of products")
    p.add_argument("--format", choices=("jsonl", "csv"), help="default: from the suffix (.jsonl/.ndjson/.json or .csv)")
    p.add_argument("--images", type=Path, help="directory the image file names are relative to (default: the input's directory)")
    p.add_argument("--version", type=int, help="version of rows that give none (default 1)")
    p.add_argument(
        "--bootstrap-servers", "--bootstrap", dest="bootstrap_servers", help="default: KAFKA_BOOTSTRAP_SERVERS or localhost:9092"
    )
    p.add_argument("--topic", help="default: PRODUCT_UPDATES_TOPIC or product-updated")
    p.add_argument("--max-in-flight", type=_positive, default=64, help="most unacknowledged events (default 64)")
    p.add_argument(
        "--max-in-flight-bytes", type=_positive, default=32 * 1024 * 1024, help="most unacknowledged payload bytes (default 32 MiB)"
    )
    p.add_argument("--max-image-bytes", type=_positive, help="largest image file (default: MAX_IMAGE_BYTES, 5 MiB)")
    p.add_argument("--checkpoint", type=Path, help="default: <input>.checkpoint")
    p.add_argument("--checkpoint-every", type=_positive, default=1000, help="save the checkpoint every N acknowledgements (default 1000)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and publish every row again")
    p.add_argument("--rejects", type=Path, help="default: <input>.rejects.jsonl (rewritten by every run)")
    p.add_argument("--limit", type=_positive, help="stop after examining N rows not in the checkpoint")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the broker: to start, per request, to stop (default 30)"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar (it is off anyway when stderr is not a TTY)"
    )
    return p.parse_args(argv)


async def _run(options: argparse.Namespace, settings: Settings) -> int:
    backfill = Backfill(options, settings)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def stop(signum: int) -> None:
        if backfill.stop_signal is None:
            backfill.stop_signal = signum
        elif task is not None:
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await backfill.run()
    except asyncio.CancelledError:
        return 128 + (backfill.stop_signal or signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``clip-search-backfill``); returns the exit status."""
    options = parse_args(argv)
    aiokafka_log = logging.getLogger("aiokafka")
    aiokafka_log.addHandler(logging.NullHandler())
    aiokafka_log.propagate = False
    try:
        overrides = {"kafka_bootstrap_servers": options.bootstrap_servers} if options.bootstrap_servers else {}
        settings = load_settings(**overrides)
        return asyncio.run(_run(options, settings))
    except ConfigError as exc:
        print(f"backfill: {str(exc).replace(chr(10), ' ')}", file=sys.stderr)
    except BackfillError as exc:
        print(f"backfill: {exc}", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

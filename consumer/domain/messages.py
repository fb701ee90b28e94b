"""A message the service publishes, as the layers above Kafka describe it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Outbound:
    """One message to publish.

    ``reply``: it answers a request, so a broker refusing it for its size is the client's doing
    (the reply is dead-lettered instead). ``client_topic``: the client named its topic, so an
    unknown or forbidden topic is the client's doing too. Anything else the broker refuses fails
    the whole publish. ``source``: the record it answers (opaque here), to dead-letter it by.
    """

    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    reply: bool = False
    client_topic: bool = False
    source: Any = field(default=None, compare=False, repr=False)

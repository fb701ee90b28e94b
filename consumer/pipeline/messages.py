"""The messages the pipeline publishes for a record: its reply, its dead letter."""

from __future__ import annotations

from consumer.config.settings import Settings
from consumer.domain.errors import InputError
from consumer.domain.messages import Outbound
from consumer.domain.wire import JSON_CONTENT_TYPE, EventType, Header
from consumer.pipeline.outcomes import Record
from schemas import ErrorReply, SearchResult


def reply_topic(settings: Settings, requested: str | None) -> str:
    """Where a reply goes: the request's ``reply_to`` when allowed, else ``REPLY_TOPIC``."""
    return requested if requested and settings.reply_topic_allowed(requested) else settings.reply_topic


def reply_message(settings: Settings, requested: str | None, reply: SearchResult | ErrorReply, source: Record) -> Outbound:
    """The reply to ``source``, keyed and correlated by its request_id, on ``reply_topic(requested)``."""
    topic = reply_topic(settings, requested)
    rid = (reply.request_id or "").encode()
    kind = EventType.SEARCH_RESULT if isinstance(reply, SearchResult) else EventType.ERROR_REPLY
    headers = [(Header.CORRELATION_ID, rid), (Header.CONTENT_TYPE, JSON_CONTENT_TYPE.encode()), (Header.EVENT_TYPE, kind.encode())]
    return Outbound(
        topic, reply.model_dump_json().encode(), rid or None, headers, reply=True, client_topic=topic != settings.reply_topic, source=source
    )


def dead_letter(settings: Settings, record: Record, err: InputError) -> Outbound:
    """``record``'s original bytes on ``DEAD_LETTER_TOPIC``, with why and where it came from in headers."""
    headers = [
        (Header.ERROR_CODE, err.code.encode()),
        (Header.ERROR_MESSAGE, err.message.encode()[:1000]),
        (Header.SOURCE_TOPIC, record.topic.encode()),
        (Header.SOURCE_PARTITION, str(record.partition).encode()),
        (Header.SOURCE_OFFSET, str(record.offset).encode()),
        (Header.ERROR_OWNER, err.owner.encode()),
    ]
    return Outbound(settings.dead_letter_topic, record.value or b"", record.key, headers)

"""The error tree and the wire error codes stay in step."""

from __future__ import annotations

from typing import get_args

from consumer.domain import errors
from schemas.events import ErrorCode


def subclasses(cls: type) -> list[type]:
    return [cls] + [s for c in cls.__subclasses__() for s in subclasses(c)]


def test_every_wire_error_code_has_an_owner_and_no_other_code_does() -> None:
    assert set(errors.OWNERS) == set(get_args(ErrorCode))
    assert errors.owner_of("internal_error") == "service"
    assert errors.owner_of("invalid_json") == "client"
    assert errors.owner_of("a_code_from_a_newer_peer") == "service"


def test_every_error_class_travels_as_a_wire_code() -> None:
    codes = {cls.code for cls in subclasses(errors.InputError)}
    assert codes <= set(get_args(ErrorCode)), codes - set(get_args(ErrorCode))
    assert errors.ServiceFailure("x").owner == "service"
    assert errors.ReplyTopicNotAllowed("x").owner == errors.ReplyUndeliverable("x").owner == "client"


def test_dependency_outages_are_told_from_bugs() -> None:
    from aiokafka.errors import KafkaConnectionError
    from pymongo.errors import ServerSelectionTimeoutError

    assert errors.is_dependency_outage(KafkaConnectionError())
    assert errors.is_dependency_outage(ServerSelectionTimeoutError("no servers"))
    assert errors.is_dependency_outage(ConnectionRefusedError())
    assert not errors.is_dependency_outage(RuntimeError("bug"))
    assert not errors.is_dependency_outage(ValueError("bad shape"))

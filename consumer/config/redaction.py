"""Secrets kept out of text: MongoDB URIs parsed and redacted, secret values scrubbed, the configuration logged safely.

Contracts:

- ``parse_mongo_uri`` is pymongo's own ``parse_uri`` (user info and options; option values not validated),
  never resolving DNS, also for ``mongodb+srv://``; None for a URI pymongo rejects (the client reports it
  when it is built). Every question about a MongoDB URI's meaning goes through it.
- ``redact_uri`` returns the URI's text with the password of its user info and the values of
  secret-looking query parameters replaced by ``***``, everything else unchanged. It never fails and
  also redacts URIs pymongo rejects: the user info ends at the last ``@`` before the query, so an
  unescaped ``@`` in a password cannot expose its tail.
- ``uri_secrets`` lists what ``redact_uri`` hides, as written and as pymongo decodes it; ``scrub``
  replaces each given secret in free text by ``***``.
- ``log_effective_config`` logs every setting as ``safe_dump`` renders it, then the security warnings.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumer.config.security import SecuritySettings

log = logging.getLogger(__name__)

_SECRET_QUERY_KEYS = re.compile(r"(password|secret|token|authmechanismproperties)", re.IGNORECASE)
_SRV_SCHEME, _SCHEME = "mongodb+srv://", "mongodb://"
_SRV_ONLY_OPTIONS = frozenset({"srvservicename", "srvmaxhosts", "srvallowedhostssuffix"})


@dataclass(frozen=True)
class MongoUri:
    """What pymongo reads from a MongoDB URI's user info and query (values decoded, option names canonical)."""

    username: str | None
    password: str | None
    options: Mapping[str, Any]


def parse_mongo_uri(uri: str) -> MongoUri | None:
    """``uri`` as pymongo parses it, without DNS; None if pymongo rejects it."""
    from pymongo.errors import PyMongoError
    from pymongo.uri_parser import parse_uri

    if uri.startswith(_SRV_SCHEME):
        uri = _srv_twin(uri)
    try:
        parsed = parse_uri(uri, validate=False)
    except (PyMongoError, ValueError):
        return None
    return MongoUri(parsed["username"], parsed["password"], parsed["options"])


def _srv_twin(uri: str) -> str:
    """The ``mongodb://`` twin of a ``mongodb+srv://`` URI, without the SRV-only options pymongo refuses there.

    ``parse_uri`` resolves a ``mongodb+srv://`` host's SRV and TXT records and (pymongo 4.20) has no
    flag to skip that; only the host list and DNS-supplied options differ, which no caller reads.
    """
    head, _, query = uri[len(_SRV_SCHEME) :].partition("?")
    separator = ";" if ";" in query and "&" not in query else "&"
    kept = [p for p in re.split(r"[&;]", query) if p.partition("=")[0].lower() not in _SRV_ONLY_OPTIONS]
    return _SCHEME + head + ("?" + separator.join(kept) if query else "")


def _redact(uri: str) -> tuple[str, list[str]]:
    """``uri`` redacted, and the raw values it hid."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri, []
    rest, has_query, query = rest.partition("?")
    userinfo, at, hosts = rest.rpartition("@")
    hidden: list[str] = []
    if at:
        user, colon, password = userinfo.partition(":")
        if colon:
            hidden.append(password)
            userinfo = f"{user}:***"
        rest = f"{userinfo}@{hosts}"
    if has_query:
        pieces = re.split(r"([&;])", query)
        for i, piece in enumerate(pieces):
            key, eq, value = piece.partition("=")
            if eq and _SECRET_QUERY_KEYS.search(key):
                hidden.append(value)
                pieces[i] = f"{key}=***"
        rest += "?" + "".join(pieces)
    return f"{scheme}://{rest}", [v for v in hidden if v]


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user info and secret-looking query values replaced by ``***``.

    Works for ``mongodb://`` and ``mongodb+srv://`` URIs with several hosts; a string without
    ``scheme://`` is returned unchanged.
    """
    return _redact(uri)[0]


def uri_secrets(uri: str) -> list[str]:
    """The secrets in ``uri``: as written (what ``redact_uri`` hides) and as pymongo decodes them."""
    found = _redact(uri)[1]
    parsed = parse_mongo_uri(uri)
    if parsed is not None:
        decoded = [parsed.password, *(str(v) for k, v in parsed.options.items() if _SECRET_QUERY_KEYS.search(k))]
        found += [v for v in dict.fromkeys(decoded) if v and v not in found]
    return found


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty value of ``secrets`` replaced by ``***`` (longest first)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def log_effective_config(settings: SecuritySettings, logger: logging.Logger | None = None) -> None:
    """Log every setting (secrets masked, URIs redacted) and warnings about weak security choices."""
    (logger or log).info("effective configuration: %s", json.dumps(settings.safe_dump(), sort_keys=True))
    for level, message in settings.security_warnings():
        log.log(level, message)

"""``python -m consumer`` with one fault injected, for tests that drive the service as a process.

Encoding any batch that contains the text in ``POISON_QUERY_TEXT`` raises ``RuntimeError``: a stand-in
for a bug that one input triggers inside the service (not a client error, not a dependency outage).
"""

from __future__ import annotations

import os

from consumer.app import main
from consumer.encoder.encoder import Encoder

POISON = os.environ["POISON_QUERY_TEXT"]
_encode_text = Encoder.encode_text


def _poisoned_encode_text(self: Encoder, texts: list[str]):
    if POISON in texts:
        raise RuntimeError(f"injected fault: the encoder fails on {POISON!r}")
    return _encode_text(self, texts)


Encoder.encode_text = _poisoned_encode_text  # type: ignore[method-assign]  # the injected fault

if __name__ == "__main__":
    main()

"""What needs the ``export`` extra, and the one line that says so when it is not installed.

``pip install clip-search`` installs the serving path only: ONNX Runtime and tokenizers on an existing
ONNX export (``consumer.encoder.onnx_backend``). Writing an export (``consumer.tools.onnx_export``, which
the service runs in a child process when the export is missing) and ``ENCODER_BACKEND=torch`` need torch,
transformers and onnx: ``pip install 'clip-search[export]'``.

Detection uses ``importlib.util.find_spec``: nothing is imported, and a module that is installed but
fails to import is not reported as missing (its own error is the better message).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

EXTRA = "export"
INSTALL = f"pip install 'clip-search[{EXTRA}]'"
TORCH_BACKEND_MODULES: tuple[str, ...] = ("torch", "transformers")
"""What ``ENCODER_BACKEND=torch`` imports (``consumer.encoder.torch_backend``)."""
EXPORT_MODULES: tuple[str, ...] = ("torch", "transformers", "onnx")
"""What an ONNX export imports (``consumer.tools.onnx_export``: tracing, int8 quantization)."""


def not_installed(modules: Iterable[str]) -> list[str]:
    """The top-level ``modules`` that cannot be found on this interpreter's path, in order."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def missing_extra(purpose: str, modules: Iterable[str]) -> str | None:
    """None when every module of ``modules`` is installed; else one line: ``<purpose> needs <missing>: pip install ...``."""
    missing = not_installed(modules)
    if not missing:
        return None
    names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
    return f"{purpose} needs {names}: {INSTALL}"

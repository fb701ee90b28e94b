"""stunnel as a TLS terminator in front of a local plaintext service (Kafka, MongoDB) for TLS tests."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
from pathlib import Path

from .process import ManagedProcess


def stunnel_binary() -> str | None:
    """Path of Debian's ``stunnel4`` (or ``stunnel``), None if not installed."""
    return shutil.which("stunnel4") or shutil.which("stunnel")


class Stunnel(ManagedProcess):
    """TLS on 127.0.0.1:`port`, forwarded as plaintext to 127.0.0.1:`target_port`.

    The server presents `cert_file` (PEM chain) with `key_file` and asks for no client
    certificate. `probe` completes a TLS handshake without verifying the certificate.
    """

    name = "stunnel"

    def __init__(
        self,
        target_port: int,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(port, workdir)
        self.target_port = target_port
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.config_path = self.workdir / "stunnel.conf"

    def command(self) -> list[str]:
        binary = stunnel_binary()
        if binary is None:
            raise FileNotFoundError("stunnel is not installed (Debian: apt-get install stunnel4)")
        self.config_path.write_text(
            "\n".join(
                [
                    "foreground = yes",
                    "syslog = no",
                    "pid =",
                    "debug = notice",
                    "[tls]",
                    f"accept = 127.0.0.1:{self.port}",
                    f"connect = 127.0.0.1:{self.target_port}",
                    f"cert = {self.cert_file}",
                    f"key = {self.key_file}",
                    "",
                ]
            )
        )
        return [binary, str(self.config_path)]

    def probe(self) -> bool:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # nosec B501  # readiness probe only; the tests verify with their CA
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw, context.wrap_socket(raw, server_hostname="localhost"):
            return True

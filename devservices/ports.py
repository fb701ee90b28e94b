"""Free TCP port allocation for local services."""

import socket


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free at call time (racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port

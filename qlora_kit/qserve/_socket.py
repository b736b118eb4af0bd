"""The listening socket both backends' HTTP fronts serve on (torch-free, so `qserve --help` stays light)."""
import socket


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port (port 0 picks a free one); IPv6 when the host has a colon."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock

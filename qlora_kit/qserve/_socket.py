"""The listening socket both backends' HTTP apps serve on, and running one in a thread (torch-free, so
`qserve --help` stays light)."""
import socket
import threading
import time


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port (port 0 picks a free one); IPv6 when the host has a colon."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def run_in_thread(server, sock: socket.socket, name: str) -> tuple[threading.Thread, str]:
    """Run a uvicorn.Server on `sock` in a daemon thread; returns (thread, "http://host:port") once it accepts
    connections (or after 30 s)."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=name)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    return thread, f"http://{host}:{port}"

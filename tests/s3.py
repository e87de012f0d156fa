"""A real S3-protocol server on loopback for the tests: moto's server mode, in this process.

Its objects live in this process's memory, so stopping the server and starting it again
on the same port is an outage that loses nothing, as a store's is.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading

import pyarrow.fs as pafs


class S3Server:
    def __init__(self, port: int):
        self.port = port
        self.server = None
        self.buckets = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def outage(self, seconds: float) -> threading.Timer:
        """Stop now and start again `seconds` later (in a timer thread, returned)."""
        self.stop()
        timer = threading.Timer(seconds, self.start)
        timer.start()
        return timer

    def new_bucket(self, hint: str) -> str:
        self.buckets += 1
        name = f"b{self.buckets}-" + re.sub(r"[^a-z0-9-]", "-", hint.lower())[:40].strip("-")
        filesystem().create_dir(name)
        return f"s3://{name}"


class HungServer:
    """A server on `port` (0: any free one) that accepts connections and never answers,
    as a hung store does; it holds what it accepted until `close`."""

    def __init__(self, port: int = 0):
        self.listener = socket.create_server(("127.0.0.1", port), backlog=256)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.listener.accept()[0])

    def close(self) -> None:
        """Stop listening (the blocked accept wakes up, so the port is free again at once)
        and drop every connection."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for connection in self.held:
            connection.close()


def filesystem() -> pafs.S3FileSystem:
    """An S3 client on the test server that may create buckets (the pipeline's may not)."""
    import os

    return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)

"""Loopback simulators of the payment platforms, one per adapter kind, for tests, the demo and a
technician's bench (`appliance simulate KIND`).

Each one speaks its platform's protocol for real. It verifies the request signatures with the
merchant's key, signs its answers with the platform's key, and keeps its books in a `Ledger`
(appliance/simulators/ledger.py). Query, reverse and refund therefore answer consistently, and
every charge is counted. The scripted behaviours are chosen by the payment code's last two
digits (the table is in ledger.py).

A simulator makes the keys it needs in its keys directory on first start and reuses them after.
`provider_options()` is the `[providers.NAME]` table that points an adapter at it. It binds
127.0.0.1 only, and it can be stopped and started again on the same port, which is how the tests
make a platform unreachable.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import socket
import ssl
import sys
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from appliance.simulators.ledger import Ledger, Trade

log = logging.getLogger(__name__)

#: kind -> the module that defines its simulator, as the module's `SIMULATOR`.
KINDS = {
    "wechat_v3": "appliance.simulators.wechat_v3",
    "wechat_v2": "appliance.simulators.wechat_v2",
    "alipay": "appliance.simulators.alipay",
    "jeepay": "appliance.simulators.jeepay",
}


def available() -> list[str]:
    """The kinds whose simulator module exists in this build."""
    return [k for k, m in KINDS.items() if importlib.util.find_spec(m) is not None]


def simulator_class(kind: str) -> type[Simulator]:
    """The simulator of an adapter kind. Raises KeyError for a kind without one."""
    if kind not in KINDS:
        raise KeyError(kind)
    return importlib.import_module(KINDS[kind]).SIMULATOR


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: dict[str, str]  # the query string's parameters (first value of each)
    headers: dict[str, str]  # lower-case names
    body: bytes
    peer_cert: dict | None = None  # the client's TLS certificate, when it showed one

    def form(self) -> dict[str, str]:
        """The body as an application/x-www-form-urlencoded form, UTF-8."""
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering
    delay_s: float = 0.0  # answer this late


class Simulator(ABC):
    """One platform's loopback server (see the module docstring). A subclass implements `handle`,
    `make_keys` and `provider_options`."""

    kind = "abstract"

    def __init__(self, keys_dir: Path, ledger: Ledger | None = None, *, port: int = 0,
                 tls: ssl.SSLContext | None = None):
        self.keys_dir = Path(keys_dir)
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ledger = ledger if ledger is not None else Ledger()
        self.port = port
        self._tls = tls
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.make_keys()

    # --- what a kind provides -------------------------------------------------------------------

    @abstractmethod
    def make_keys(self) -> None:
        """Create the merchant's and the platform's keys in `keys_dir` unless they exist."""

    @abstractmethod
    def handle(self, req: Request) -> Answer:
        """Answer one request, as the platform would."""

    @abstractmethod
    def provider_options(self) -> dict:
        """The `[providers.NAME]` table (kind included) that points an adapter at this simulator."""

    # --- shared behaviour -----------------------------------------------------------------------

    def deliver(self, trade: Trade, new: bool, answer: Answer) -> Answer:
        """A pay answer as the trade's scenario has it arrive: dropped after the charge (96), late
        (97), or as it is. A repeated pay is answered at once."""
        if new and trade.scenario == "96":
            return Answer(drop=True)
        if new and trade.scenario == "97":
            answer.delay_s = self.ledger.slow_s
        return answer

    @staticmethod
    def forged(trade: Trade | None) -> bool:
        """Whether this trade's pay answer goes out with a damaged signature (scenario 80)."""
        return trade is not None and trade.scenario == "80"

    @property
    def url(self) -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> Simulator:
        """Listen (again) on 127.0.0.1; the first start picks the port when it is 0."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.simulator = self
        if self._tls is not None:
            server.socket = self._tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"sim-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (the ledger is kept). Answers still waiting (scenario 97) are abandoned."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self, req: Request) -> Answer:
        try:
            return self.handle(req)
        except Exception:  # a simulator bug: answer like a broken platform, say why on stderr
            log.exception("simulator %s: %s %s failed", self.kind, req.method, req.path)
            return Answer(500, b"simulator error")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    simulator: Simulator

    def handle_error(self, request, client_address):
        """A client that gave up (its read timeout, during a slow answer) is routine, not a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("simulator %s: %s hung up", self.simulator.kind, client_address)
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a stopped simulator is really gone
    server: _Server

    def do_GET(self):
        self._answer()

    do_POST = do_PUT = do_DELETE = do_GET

    def _answer(self):
        sim = self.server.simulator
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        req = Request(self.command, parts.path, dict(parse_qsl(parts.query, keep_blank_values=True)),
                      {k.lower(): v for k, v in self.headers.items()}, body, peer or None)
        answer = sim._serve(req)
        if answer.drop:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if answer.delay_s and sim._stopping.wait(answer.delay_s):
            return  # stopped while waiting: the answer never leaves
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        log.debug("simulator %s: " + format, self.server.simulator.kind, *args)

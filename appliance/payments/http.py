"""What every HTTP platform adapter shares: the gateway options, a time-bounded HTTP client, and
the rule for answers that are not signed by the platform.

Transport failures are sorted into the two kinds the Provider port needs:

* `ProviderUnavailable`: provably nothing left this device. DNS failed, or the TCP connection or
  the TLS handshake failed, on every URL. For a pay, the till may treat the payment as not
  attempted.
* `NoAnswer`: the request may have reached the platform. The read timed out, the connection was
  reset after sending, the answer was too large, or its Content-Encoding did not decode. The
  adapter answers UNKNOWN, and the payment is resolved by query.

`backup_base_urls` are tried in order, and only while nothing was sent. A request that may have
arrived is never sent again to another address: for a pay, that could charge twice.

Time: one call takes at most `call_limit_s` = `connect_timeout_s` x (number of URLs) +
2 x `read_timeout_s`. A read that keeps trickling bytes is cut off at the first chunk after
`read_timeout_s`, and that chunk can take one more `read_timeout_s` to arrive. The options refuse
settings whose limit exceeds `MAX_CALL_S`, which is half the systemd watchdog interval. The till
pings the watchdog between calls, so even a call that runs out of time cannot starve it.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from appliance.errors import ConfigError, NoAnswer, ProviderMisconfigured, ProviderUnavailable
from appliance.payments import Outcome, ResolutionPolicy, Status
from appliance.schema import FIRST_QUERY_AFTER, QUERY_EVERY, RETRY_EVERY, REVERSE_AFTER, SECONDS, FieldError, between, opt

log = logging.getLogger(__name__)

#: The longest one platform call may take, in seconds: half of WatchdogSec=30 in systemd/appliance.service.
MAX_CALL_S = 15.0
#: The largest answer read, in bytes. Every barcode-payment answer is a few KB.
MAX_ANSWER_BYTES = 1 << 20
#: The ranges of the time limits, for every adapter that declares its own defaults.
CONNECT_TIMEOUT = between(0.1, 10.0, SECONDS)
READ_TIMEOUT = between(0.1, 7.0, SECONDS)


def gateway_url(value: str) -> str:
    """Check a gateway address: https, or http only to a loopback address (the simulators).
    Returns it without a trailing slash. Raises ValueError (the schema names the key)."""
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError as e:
        raise ValueError(f"is not a URL ({e}): {value!r}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError(f"must be an https:// address, got {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"must not carry a query, a fragment or credentials, got {value!r}")
    if parts.scheme == "http" and not loopback_host(host):
        raise ValueError(f"plain http:// is refused except to a loopback address (a simulator); use https://, "
                         f"got {value!r}")
    return value.rstrip("/")


def loopback_host(host: str) -> bool:
    """Whether a URL's host is this machine (localhost, 127.0.0.0/8, ::1): where a simulator runs."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def link_problem(url: str) -> str:
    """Why a download link a platform answered (a bill's) is not fetched ("" when it may be): it must
    be https, or http only to this machine (a simulator), like every gateway address. The reason
    names the scheme and host only, never the link's query (a one-use token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.username or parts.password:
        return "it carries credentials"
    if parts.scheme == "https" and host or parts.scheme == "http" and loopback_host(host):
        return ""
    return f"{parts.scheme or 'no scheme'}://{host}: only https, or plain http to a loopback address, is fetched"


def gateway_urls(values: tuple[str, ...]) -> tuple[str, ...]:
    if len(values) > 2:
        raise ValueError(f"at most 2 backup addresses, got {len(values)}")
    return tuple(gateway_url(v) for v in values)


@dataclass(frozen=True, kw_only=True)
class HttpOptions:
    """Options every HTTP adapter has. An adapter's options subclass this, redeclaring `base_url`
    with its platform's default and the policy fields with the platform's official timings."""

    base_url: str = opt(check=gateway_url, doc="the gateway up to the API paths")
    backup_base_urls: tuple[str, ...] = opt((), check=gateway_urls,
                                            doc="tried in order when nothing reached base_url")
    connect_timeout_s: float = opt(2.0, check=CONNECT_TIMEOUT, doc="TCP connect + TLS handshake, per URL")
    read_timeout_s: float = opt(5.0, check=READ_TIMEOUT, doc="waiting for the answer")
    ca_file: Path | None = opt(None, doc="PEM bundle of a private CA (default: the system's)")
    first_query_after_s: float = opt(5.0, check=FIRST_QUERY_AFTER,
                                     doc="an uncertain payment: wait this long before the first query")
    query_every_s: float = opt(10.0, check=QUERY_EVERY)
    reverse_after_s: float = opt(45.0, check=REVERSE_AFTER,
                                 doc="give up querying and reverse, counted from the pay call")
    retry_every_s: float = opt(10.0, check=RETRY_EVERY, doc="between reverse/refund retries")

    def __post_init__(self):
        if self.call_limit_s > MAX_CALL_S:
            raise FieldError("read_timeout_s", f"connect_timeout_s x {1 + len(self.backup_base_urls)} URLs + "
                                               f"2 x read_timeout_s = {self.call_limit_s:g} s exceeds "
                                               f"{MAX_CALL_S:g} s (half the watchdog interval)")

    @property
    def call_limit_s(self) -> float:
        """The longest one call can take, in seconds (see the module docstring)."""
        return self.connect_timeout_s * (1 + len(self.backup_base_urls)) + 2 * self.read_timeout_s

    def policy(self) -> ResolutionPolicy:
        return ResolutionPolicy(first_query_after_s=self.first_query_after_s, query_every_s=self.query_every_s,
                                reverse_after_s=self.reverse_after_s, retry_every_s=self.retry_every_s)


@dataclass(frozen=True)
class Reply:
    """A complete HTTP answer. `headers` keys are lower-case; `body` is the raw bytes."""

    status: int
    headers: dict[str, str]
    body: bytes
    base_url: str  # which gateway address answered

    def text(self) -> str:
        """The body as UTF-8, whatever charset the gateway declared (WeChat v2 declares none).
        Raises NoAnswer if it is not UTF-8."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise NoAnswer(f"HTTP {self.status}: the answer is not UTF-8 text") from None


class Gateway:
    """A platform's addresses and one HTTP client for them. Safe to share across threads (httpx's
    Client is), so the till and the resolver call through the same connection pool."""

    def __init__(self, options: HttpOptions, *, key: str, client_cert: tuple[Path, Path] | None = None):
        """`key`: the config table (`providers.NAME`) named in errors. `client_cert`: (certificate,
        private key) PEM files for two-way TLS. Raises ConfigError when the CA or the certificate
        cannot be loaded."""
        self.urls = (options.base_url, *options.backup_base_urls)
        self.call_limit_s = options.call_limit_s
        self._read_s = options.read_timeout_s
        self._answer_s = options.connect_timeout_s + options.read_timeout_s  # one URL: connect, then answer
        self._client = httpx.Client(
            verify=_tls_context(options.ca_file, client_cert, key),
            timeout=httpx.Timeout(connect=options.connect_timeout_s, read=options.read_timeout_s,
                                  write=options.read_timeout_s, pool=options.connect_timeout_s),
            follow_redirects=False, trust_env=False)  # no proxy from the environment, no redirect to elsewhere

    def request(self, method: str, path: str = "", *, body: bytes | None = None,
                headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
                max_bytes: int = MAX_ANSWER_BYTES, answer_s: float | None = None) -> Reply:
        """Send to the first address that accepts a connection; return its complete answer, whatever
        its HTTP status. Raises ProviderUnavailable (nothing sent anywhere), NoAnswer (maybe sent,
        no complete answer) or ProviderMisconfigured (the address itself is unusable).

        `max_bytes` and `answer_s` (the whole answer's time, from the request) are raised only for
        head office's bill downloads; a lane's calls keep the defaults, bounded by `call_limit_s`.
        `path` may be a full http(s) URL (a bill's download link): then it is the only address, and
        errors name it without its query (a one-use token)."""
        refused = []
        link = path.startswith(("https://", "http://"))
        for base in [""] if link else self.urls:
            where = path.partition("?")[0] + ("?…" if "?" in path else "") if link else base + path
            try:
                return self._once(base, method, path, body, headers, params, max_bytes, answer_s, where)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                refused.append(f"{base or where}: {_why(e)}")  # nothing was sent: the next address may take it
            except httpx.UnsupportedProtocol as e:
                raise ProviderMisconfigured(f"{base or where}: {e}") from None
            except (httpx.TransportError, httpx.DecodingError) as e:  # timeout, reset, protocol or
                # Content-Encoding error (DecodingError is no TransportError): maybe sent
                raise NoAnswer(f"{where}: {_why(e)}") from None
        raise ProviderUnavailable("; ".join(refused))

    def _once(self, base, method, path, body, headers, params, max_bytes, answer_s, where) -> Reply:
        deadline = time.monotonic() + (answer_s or self._answer_s)
        with self._client.stream(method, base + path, content=body, headers=headers, params=params) as r:
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise NoAnswer(f"{where}: answer larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise NoAnswer(f"{where}: answer still arriving after {answer_s or self._read_s:g} s")
            return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, b"".join(chunks), base)

    def close(self) -> None:
        self._client.close()


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _tls_context(ca_file: Path | None, client_cert: tuple[Path, Path] | None, key: str) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{key}.ca_file", f"{ca_file}: cannot load the CA bundle: {e}") from None
    if client_cert is not None:
        cert, private = client_cert
        try:
            ctx.load_cert_chain(str(cert), str(private))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{key}.client_cert_file", f"{cert} with {private}: cannot load the client "
                                                         f"certificate and its key: {e}") from None
    return ctx


class UntrustedAnswers:
    """An answer whose signature does not verify is never trusted: the call answers UNKNOWN and a
    signed query decides. Each is logged as a security event, once per (call, out_trade_no), not
    on every retry."""

    _MAX_REMEMBERED = 1000

    def __init__(self, provider: str):
        self.provider = provider
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def outcome(self, call: str, out_trade_no: str, why: str) -> Outcome:
        with self._lock:
            first = (call, out_trade_no) not in self._seen
            if len(self._seen) >= self._MAX_REMEMBERED:
                self._seen.clear()
            self._seen.add((call, out_trade_no))
        if first:
            log.error("SECURITY: platform %s: the %s answer for %s does not verify (%s); not trusted, a signed "
                      "query decides", self.provider, call, out_trade_no, why)
        return Outcome(Status.UNKNOWN, f"answer not trusted: signature does not verify ({why})")

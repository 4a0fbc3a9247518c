"""Secrets never leak: a whole lane session as real processes, then a hunt through all it left behind.

The session: `appliance demo`; and on one state dir, `appliance run` at DEBUG level fed scans for
every sandbox outcome (paid, declined, expired, the customer's password both ways, SYSTEMERROR,
unreachable and accepted offline, then declined as too old or cancelled, a lost answer, a slow
answer, a password above the password-free limit), a cancel, a stutter, junk and defective scans;
beside it the CLI: `charge` (code on stdin and as --code, and refusals that must not echo it),
`cancel`, `journal` (table, --json, --txn), `check-config`, `classify`, `scan-test`. Every secret
file the config schema has (every `SecretFile` key, adapter options included) is configured and
holds a distinctive random value.

Once no payment is open, every byte any process printed and every byte of every file in the state
dir (journal.sqlite, -wal, -shm, the sandbox ledger, key and id files), both while the service
still runs and after it stopped, is searched for each full payment code, for each secret value and
for the code-digest key. Masks of codes must be exactly `redact.mask`'s.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import signal
import subprocess
import threading
import time
import types
import typing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance.config import Config, ProviderConfig, SecretFile, load, pem_private_key_file
from appliance.demo import SCRIPT as DEMO_SCRIPT
from appliance.journal import OPEN_STATES, Journal
from appliance.payments import provider_options
from appliance.payments import wechat_v2
from appliance.payments.keys import ALNUM, generate_rsa, private_key_file
from appliance.redact import mask
from appliance.simulators.wechat_v2 import new_certificate, private_pem
from conftest import appliance_cmd, lane_dict, subprocess_env, write_config

pytestmark = pytest.mark.integration

def _rsa_private_key() -> str:
    """A fresh RSA private key as the bare base64 of PKCS#8 (Alipay's key tool format): the random
    token of a secret file whose check wants a real key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return base64.b64encode(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())).decode()


def _rsa_public_key_file(secret_dir: Path) -> str:
    path = secret_dir / "platform-public-key.pem"
    if not path.exists():
        generate_rsa(secret_dir / "platform-private-key.pem", path)
    return str(path)


def _wechat_v2_certificate(section: dict) -> None:
    """client_cert_file: a certificate issued for the key just written to client_key_file (the
    adapter loads the two as a pair)."""
    _certificate_for(section, "client_key_file", "client_cert_file")


#: Options a provider kind needs besides its secret files, for the config this test writes; a
#: callable value is given the secret dir. A new adapter with a secret key and required options
#: gets its entry here (the test says so).
PROVIDER_REQUIRED_OPTIONS: dict[str, dict] = {
    "alipay": {"app_id": "9021000158600001", "alipay_public_key_file": _rsa_public_key_file},
    "jeepay": {"base_url": "https://pay.example.com", "mch_no": "M1700000001", "app_id": "66a1f0c2e4b0a1b2c3d4e5f6"},
    "wechat_v2": {"mch_id": "1900000109", "appid": "wxd930ea5d5a258f4f"},
    "wechat_v3": {"mchid": "1900000109", "appid": "wxd678efh567hg6787",
                  "merchant_serial": "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
                  "platform_public_key_id": "PUB_KEY_ID_0119000001092024112600000000000001",
                  "platform_public_key_file": _rsa_public_key_file},
}
def _mqtt_client_certificate(section: dict) -> None:
    """cert_file: a certificate for the key just written to key_file, over TLS (the config checks the pair)."""
    _certificate_for(section, "key_file", "cert_file")
    section["tls"] = True


def _certificate_for(section: dict, key_option: str, cert_option: str) -> None:
    key_file = Path(section[key_option])
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    cert = key_file.with_name(key_file.name + ".cert.pem")
    cert.write_bytes(new_certificate("secrets test", key).public_bytes(serialization.Encoding.PEM))
    section[cert_option] = str(cert)


#: Options made from a kind's secrets once they are written: kind -> fn(its provider table).
PROVIDER_DERIVED_OPTIONS = {"wechat_v2": _wechat_v2_certificate}
#: The same for the other sections: section name -> fn(its table).
SECTION_DERIVED_OPTIONS = {"mqtt": _mqtt_client_certificate}
#: Secret-file checks that need a real key rather than a random token, and how to make one.
SECRET_VALUES = {
    private_key_file: _rsa_private_key,
    wechat_v2.API_KEY: lambda: "".join(random.SystemRandom().choice(ALNUM) for _ in range(32)),
    wechat_v2.pem_private_key_file: lambda: private_pem(rsa.generate_private_key(public_exponent=65537,
                                                                                 key_size=2048)).decode(),
    pem_private_key_file: lambda: private_pem(rsa.generate_private_key(public_exponent=65537,
                                                                       key_size=2048)).decode(),
}

# --- the config: every secret key of the schema, each with its own random value -----------------


def _unoptional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def schema_secret_keys() -> set[str]:
    """Every config key whose value is a secret file, dotted; adapter options as `providers.<kind>.key`."""
    return set(schema_secret_checks())


def schema_secret_checks() -> dict:
    """schema_secret_keys() -> the schema check of each (None where it has none)."""
    keys: dict = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = _unoptional(hints[f.name])
            if typing.get_origin(tp) is dict and typing.get_args(tp)[1] is ProviderConfig:
                for kind, options in provider_options().items():
                    walk(options, f"{prefix}{f.name}.<{kind}>.")
            elif tp is SecretFile:
                keys[prefix + f.name] = f.metadata.get("check")
            elif dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")

    walk(Config, "")
    return keys


def configured_secret_keys(cfg: Config) -> set[str]:
    """The secret keys a loaded config really set, in schema_secret_keys' form."""
    keys: set[str] = set()

    def walk(obj, prefix: str) -> None:
        if isinstance(obj, SecretFile):
            keys.add(prefix.rstrip("."))
        elif isinstance(obj, ProviderConfig):
            walk(obj.options, prefix)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                kind = f"<{v.kind}>" if isinstance(v, ProviderConfig) else k
                walk(v, f"{prefix}{kind}.")
        elif dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{prefix}{f.name}.")

    walk(cfg, "")
    return keys


def with_every_secret(doc: dict, secret_dir: Path) -> dict[str, tuple[Path, str]]:
    """Point every secret key of the schema at its own 0600 file holding a random token; return
    key -> (file, token)."""
    secret_dir.mkdir(mode=0o700)
    values = {}
    for key, check in sorted(schema_secret_checks().items()):
        value = SECRET_VALUES.get(check, lambda: f"{random.SystemRandom().getrandbits(160):040x}")()
        path = secret_dir / re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        path.write_text(value + "\n")
        path.chmod(0o600)
        *table, leaf = key.split(".")
        if table[0] == "providers":
            kind = table[1].strip("<>")
            name = next((n for n, p in doc["providers"].items() if p["kind"] == kind), f"{kind}_secrets")
            required = {k: v(secret_dir) if callable(v) else v
                        for k, v in PROVIDER_REQUIRED_OPTIONS.get(kind, {}).items()}
            section = doc["providers"].setdefault(name, {"kind": kind, **required})
        else:
            section = doc
            for t in table:
                section = section.setdefault(t, {})
        section[leaf] = str(path)
        values[key] = (path, value)
    for section in doc["providers"].values():
        PROVIDER_DERIVED_OPTIONS.get(section["kind"], lambda _: None)(section)
    for name, derive in SECTION_DERIVED_OPTIONS.items():
        if name in doc:
            derive(doc[name])
    return values


# --- payment codes, fresh for every run -----------------------------------------------------------

_rng = random.Random()


def code(prefix: str, length: int, outcome: str) -> str:
    """A payment code of a wallet (prefix, length) whose last two digits pick the sandbox outcome."""
    middle = "".join(_rng.choice("0123456789") for _ in range(length - len(prefix) - 2))
    return prefix + middle + outcome


def wechat(outcome: str) -> str:
    return code("13", 18, outcome)


# --- real processes whose output is kept ------------------------------------------------------------


class Proc:
    """A real `appliance` process; its stdout and stderr are collected line by line as they come."""

    def __init__(self, name: str, args: list[str]):
        self.name = name
        self.p = subprocess.Popen(appliance_cmd() + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=subprocess_env())
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._readers = [threading.Thread(target=self._read, args=(s, into), daemon=True)
                         for s, into in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, into: list[bytes]) -> None:
        for line in iter(stream.readline, b""):
            into.append(line)

    def feed(self, *lines: str | bytes) -> None:
        for line in lines:
            self.p.stdin.write((line.encode() if isinstance(line, str) else line) + b"\n")
        self.p.stdin.flush()

    def wait_for(self, pattern: bytes, lines: list[bytes], start: int, timeout: float = 15.0) -> int:
        """Index just past the first line from `start` on that matches; fails the test on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(start, len(lines)):
                if re.search(pattern, lines[i]):
                    return i + 1
            if self.p.poll() is not None and not any(t.is_alive() for t in self._readers):
                break
            time.sleep(0.02)
        tail = b"".join(lines[start:][-15:]).decode(errors="replace")
        pytest.fail(f"{self.name}: no line matching {pattern!r} within {timeout}s; last lines:\n{tail}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process unless it has ended, wait for it (kill it after `timeout`), return its exit code."""
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        for t in self._readers:
            t.join(timeout=5)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()
        return rc

    def outputs(self) -> dict[str, bytes]:
        return {f"{self.name} stdout": b"".join(self.out), f"{self.name} stderr": b"".join(self.err)}


class Session:
    """One lane's state dir and config, the processes run on it, and everything they printed."""

    def __init__(self, tmp: Path):
        self.state = tmp / "state"
        doc = lane_dict(self.state, scanner={"kind": "stdin"}, indicator={"kind": "log"},
                        till={"order_timeout_s": 10.0, "cancel_timeout_s": 10.0},
                        offline={"enabled": True, "forward_within_s": 2.0},
                        logging={"level": "DEBUG"})
        doc["providers"]["sandbox"]["slow_ms"] = 200
        # mqtt.enabled stays false: the uplink is not built yet, and enabling it will need a broker.
        self.secrets = with_every_secret(doc, tmp / "secrets")
        self.conf = write_config(tmp / "appliance.toml", doc)
        self.outputs: dict[str, bytes] = {}
        self.texts: list[str] = []  # every text given to the appliance: its mask is what may be shown
        self.procs: list[Proc] = []
        self._n = 0

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(name, list(args))
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if not proc.p.stdout.closed:
                proc.stop(signal.SIGKILL)

    def cli(self, *args: str, stdin: str | None = None, expect: int | None = 0) -> subprocess.CompletedProcess:
        r = subprocess.run(appliance_cmd() + list(args) + ["--config", str(self.conf)], input=(stdin or "").encode(),
                           capture_output=True, env=subprocess_env(), timeout=60)
        self._n += 1
        label = f"cli#{self._n} {' '.join(args[:3])}"
        self.outputs[f"{label} stdout"] = r.stdout
        self.outputs[f"{label} stderr"] = r.stderr
        if expect is not None:
            assert r.returncode == expect, f"{label}: exit {r.returncode}\n{r.stderr.decode(errors='replace')}"
        return r

    def charge(self, order: str, amount: str, payment_code: str, *extra: str, expect: int | None = 0):
        self.texts.append(payment_code)
        return self.cli("charge", "--order", order, "--amount", amount, "--code", payment_code, *extra, expect=expect)

    def open_txns(self) -> list:
        journal = Journal(self.state, "S0001", "L01", readonly=True)
        try:
            return journal.open_txns()
        finally:
            journal.close()

    def state_files(self, when: str) -> dict[str, bytes]:
        return {f"{when}: {p.relative_to(self.state)}": p.read_bytes() for p in sorted(self.state.rglob("*"))
                if p.is_file()}


def scan_step(service: Proc, *scans: str | bytes, texts: list[str]) -> None:
    """Feed scans to the running service and wait until its lane is back to ready."""
    start = len(service.err)
    texts.extend(s for s in scans if isinstance(s, str))
    service.feed(*scans)
    service.wait_for(rb"indicator: ready", service.err, start)


# --- the hunt -------------------------------------------------------------------------------------------


def find_leaks(needles: dict[str, bytes], haystacks: dict[str, bytes]) -> list[str]:
    return [f"{what} found in {where}" for what, needle in needles.items()
            for where, data in haystacks.items() if needle in data]


def wrong_masks(outputs: dict[str, bytes], texts: list[str], codes: list[str]) -> list[str]:
    """Masks in the outputs that are not exactly redact.mask of a text the appliance was given, and any
    run of 10 characters of a payment code (more than a mask ever shows)."""
    masks = sorted({mask(t) for t in texts}, key=len, reverse=True)
    found = []
    for where, data in outputs.items():
        text = data.decode("utf-8", errors="replace")
        for m in masks:
            text = text.replace(m, "<mask>")
        found += [f"{m!r} in {where}" for m in re.findall(r"\S*\*{3,}\S*", text)]
        found += [f"10 characters of {mask(c)} in {where}" for c in codes
                  if any(c[i:i + 10] in text for i in range(len(c) - 9))]
    return found


@pytest.fixture
def session(tmp_path):
    s = Session(tmp_path)
    yield s
    s.close()


def test_no_payment_code_or_secret_leaks_from_a_whole_session(session):
    s = session
    demo = s.start("demo", "demo", "--pause", "0.1")  # its own temporary state dir, in parallel

    assert "mqtt.password_file" in s.secrets
    shown = s.cli("check-config").stdout.decode()
    for key, (path, token) in s.secrets.items():
        assert f'"{path}"  # secret, content not shown' in shown and token not in shown, key
    assert configured_secret_keys(load(s.conf)) == schema_secret_keys(), (
        "a secret key of the schema is not configured by this test: extend with_every_secret or "
        "PROVIDER_REQUIRED_OPTIONS")

    # The lane at DEBUG level, fed by its scanner: every sandbox outcome, offline acceptance, cancels.
    service = s.start("run", "run", "--config", str(s.conf))
    service.wait_for(rb"indicator: ready", service.err, 0)
    step = lambda *scans: scan_step(service, *scans, texts=s.texts)  # noqa: E731
    codes = {
        "R01": wechat("17"),  # paid, scanned twice (stutter), cancelled at the end
        "R02": code("28", 18, "90"),  # declined: balance
        "R03": wechat("91"),  # declined: code expired
        "R04": wechat("92"),  # the customer's password, then paid
        "R05": wechat("93"),  # the customer's password, given up
        "R06": wechat("94"),  # SYSTEMERROR until reversed
        "R07": code("62", 19, "95"),  # unreachable: accepted offline, declined as not forwarded in time
        "R08": wechat("95"),  # unreachable: accepted offline, then cancelled before forwarding
        "R09": wechat("96"),  # charged, answer lost
        "R10": wechat("97"),  # slow answer
        "R11": code("01", 19, "42"),  # above the password-free limit
    }
    amounts = {"R01": "12.50", "R11": "1500.00"}
    stray = {"no order": wechat("18"), "wrapped": wechat("19"), "long": wechat("20"), "overlong": wechat("29"),
             "not UTF-8": wechat("21")}
    step("HELLO-WORLD")
    step(stray["no order"])
    step(f"PAY:{stray['wrapped']}")
    step(b"\xff\xfe" + stray["not UTF-8"].encode())
    step("7" * 4000 + stray["long"] + "7" * 200)  # long, still read whole
    step("7" * 9000 + stray["overlong"] + "7" * 200)  # too long: a defect
    for order, c in codes.items():
        ticket = f"ORD:{order}:{amounts.get(order, '3.00')}"
        step(ticket, c, *([c] if order == "R01" else []))
        if order == "R08":  # within offline.forward_within_s
            step("CMD:CANCEL", ticket)
    step("CMD:CANCEL", "ORD:R01:12.50")

    # The CLI beside it: charges (the code on stdin, as --code, refused), cancels, classify, scan-test.
    cli_codes = {"C01": wechat("22"), "C02": wechat("95"), "C03": wechat("96")}
    s.texts.append(cli_codes["C01"])
    s.cli("charge", "--order", "C01", "--amount", "2.00", "--code", "-", stdin=cli_codes["C01"] + "\n")
    s.charge("C02", "2.00", cli_codes["C02"], expect=4)  # accepted offline here, declined by the service later
    s.charge("C03", "2.00", cli_codes["C03"], "--wait", "5", "--json")
    refused = {"bad amount": wechat("23"), "bad order": wechat("24"), "order paid": wechat("25"),
               "bad --wait": wechat("26"), "--wait out of range": wechat("27"), "no amount": wechat("30")}
    s.charge("C04", "1.005", refused["bad amount"], expect=5)
    s.charge("C04", "1.005", refused["bad amount"], "--json", expect=5)
    s.charge("bad order!", "2.00", refused["bad order"], expect=5)
    s.charge("C01", "2.00", refused["order paid"], expect=5)
    s.charge("C05", "2.00", codes["R01"], expect=5)  # used before
    s.charge("C05", "2.00", cli_codes["C01"], "--json", expect=5)
    s.charge("C06", "2.00", refused["bad --wait"], "--wait", "abc", expect=2)
    s.charge("C06", "2.00", refused["--wait out of range"], "--wait", "nan", expect=5)
    s.charge("C06", "2.00", "1345678", expect=5)  # not a payment code
    s.cli("charge", "--order", "C07", "--code", refused["no amount"], expect=2)
    s.cli("cancel", "--order", "C01")
    s.cli("cancel", "--order", "C01", "--json", expect=5)
    classified = [codes["R01"], cli_codes["C02"], "ORD:X1:1.00", "CMD:CANCEL", "junk"]
    s.texts += classified
    s.cli("classify", "--json", *classified)
    s.cli("classify", "-", stdin="\n".join(classified) + "\n")
    scan_test = s.start("scan-test", "scan-test", "--config", str(s.conf))
    probes = [wechat("28"), "ORD:X2:1.00"]
    s.texts += probes
    scan_test.feed(*probes)
    scan_test.wait_for(rb"^#2\s", scan_test.out, 0)
    scan_test.stop(signal.SIGINT)

    # Every payment final; then the technician's view of them.
    deadline = time.monotonic() + 15
    while open_txns := s.open_txns():
        assert time.monotonic() < deadline, f"still open: {[(t.order, str(t.state)) for t in open_txns]}"
        time.sleep(0.1)
    journal = Journal(s.state, "S0001", "L01", readonly=True)
    final = {t.order: t for t in journal.recent(limit=100)}
    journal.close()
    assert {o: str(final[o].state) for o in ("R07", "R08", "C02", "R06", "R01")} == {
        "R07": "declined", "R08": "cancelled", "C02": "declined", "R06": "reversed", "R01": "cancelled"}
    assert not OPEN_STATES & {t.state for t in final.values()}
    s.cli("journal")
    s.cli("journal", "--json")
    for order in ("R07", "R08", "C02", "R01"):
        s.cli("journal", "--txn", str(final[order].txn_id), "--json")
    s.cli("journal", "--txn", str(final["R07"].txn_id))

    files = s.state_files("while running")  # the journal's -wal and -shm exist while it is open
    assert any(name.endswith("journal.sqlite-wal") for name in files)
    assert service.stop() == 0
    demo.p.wait(timeout=30)
    assert demo.stop() == 0
    files |= s.state_files("after stop")
    outputs = {**s.outputs, **service.outputs(), **scan_test.outputs(), **demo.outputs()}

    # The hunt.
    demo_texts = [t for t, _ in DEMO_SCRIPT]
    all_codes = [*codes.values(), *stray.values(), *cli_codes.values(), *refused.values(), probes[0],
                 *(t for t in demo_texts if t.isdigit())]
    key = (s.state / "code-digest.key").read_text()
    digest_key = json.loads(key)["key"]
    needles = {f"payment code {mask(c)}": c.encode() for c in all_codes}
    needles |= {f"secret {k}": token.encode() for k, (_, token) in s.secrets.items()}
    key_needles = {"the code-digest key (hex)": digest_key.encode(), "the code-digest key": bytes.fromhex(digest_key)}
    key_files = {k: v for k, v in files.items() if k.endswith("code-digest.key")}  # where the key must be
    others = {**outputs, **{k: v for k, v in files.items() if k not in key_files}, "the config": s.conf.read_bytes()}
    leaks = find_leaks(needles, others | key_files) + find_leaks(key_needles, others)
    assert not leaks, "\n".join(leaks)
    bad = wrong_masks(outputs, s.texts + demo_texts, all_codes)
    assert not bad, "\n".join(bad)

    # The hunt looked where it matters: the session went through the paths that print or store codes.
    said = b"".join(outputs.values()).decode(errors="replace")
    for seen in ("pending -> deferred", "not forwarded in time", "cancelled before forwarding", "-> reversed",
                 "repeated within", "already used", "not understood", "no order pending", "not UTF-8",
                 "longer than", "must be between", "invalid float value", "is not a payment code"):
        assert seen in said, seen

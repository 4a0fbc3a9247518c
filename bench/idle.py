"""Idle and footprint of `appliance run` (issue 10, targets 3 and 4), each figure against a ceiling
taken in the same run:

* exec -> READY=1: from the exec of `python -m appliance run` to its READY=1 datagram on our own
  NOTIFY_SOCKET (median of a few starts), beside the time `python -c "import peewee, gpiozero,
  serial, paho.mqtt.client"` takes to run. Target: <= 0.3 s.
* idle: wakeups per second (every thread's voluntary context switches, from
  /proc/PID/task/*/status: each is a sleep, which a wakeup ends; the involuntary ones, a running
  thread preempted by the machine's other work, are printed beside them) and share of one core (every thread's time on CPU, from schedstat) over
  `--idle-s` seconds after READY with no payment open, beside an idle Python process that has
  imported the same modules (the ceiling: 0 wakeups). WATCHDOG_USEC is set as the unit sets it
  (WatchdogSec=30); every WATCHDOG=1 gap must stay below it. Measured twice: `[mqtt]` disabled,
  and enabled against a real mosquitto (tests/broker.py), connected and idle. Targets, each:
  <= 1 wakeup/s, <= 0.1 % of a core.
* footprint: VmRSS after `--payments` payments through the control socket (sandbox platform),
  and its growth over the last half of them. Targets: <= 30 MB, growth <= 0.5 MB.

One line per figure with its ratio or target; exit status 1 when a target is missed.

    python bench/idle.py            # full size: 60 s idle twice, 10,000 payments
    python bench/idle.py --smoke    # a few seconds (the test suite runs it so it cannot rot)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from appliance import control  # noqa: E402

#: The unit's WatchdogSec (systemd/appliance.service), as systemd passes it.
WATCHDOG_USEC = 30_000_000
READY_TARGET_S = 0.3
WAKEUPS_TARGET = 1.0
CPU_TARGET_PCT = 0.1
RSS_TARGET_MB = 30.0
GROWTH_TARGET_MB = 0.5
#: What the footprint's lane (stdin scanner, sandbox, no uplink) imports, for the ceilings: a process
#: that imported them and sleeps (its wakeups, its RSS). As `appliance run` does, without psycopg2.
LANE_IMPORTS = ("import sys; sys.modules.setdefault('psycopg2', None); import appliance.cli, appliance.service, "
                "appliance.logs, appliance.scan.stdin, appliance.payments.sandbox, appliance.indicator.log; "
                "appliance.cli.build_parser()")
IMPORT_CEILING = "import peewee, gpiozero, serial, paho.mqtt.client"


class Notify:
    """A NOTIFY_SOCKET of our own: every datagram the service sends, with its monotonic time."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self._cond:
                now = time.monotonic()
                self.messages += [(now, line) for line in data.decode().splitlines()]
                self._cond.notify_all()

    def wait_for(self, line: str, timeout: float) -> float:
        """The monotonic time `line` first came; raises TimeoutError after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: any(m == line for _, m in self.messages), timeout):
                raise TimeoutError(f"no {line} within {timeout:g}s")
            return next(t for t, m in self.messages if m == line)

    def times(self, line: str) -> list[float]:
        with self._cond:
            return [t for t, m in self.messages if m == line]

    def close(self) -> None:
        self.sock.close()


def lane_doc(state_dir: Path, mqtt: dict | None = None) -> dict:
    doc = {"terminal": {"store_id": "S0001", "terminal_id": "L01", "state_dir": str(state_dir)},
           "scanner": {"kind": "stdin"}, "indicator": {"kind": "log"},
           "providers": {"sandbox": {"kind": "sandbox"}},
           "routing": {t: "sandbox" for t in ("wechat", "alipay")}}
    if mqtt:
        doc["mqtt"] = mqtt
    return doc


def write_config(path: Path, doc: dict) -> Path:
    from conftest import write_config as write

    return write(path, doc)


class Lane:
    """One `appliance run` process on its own state dir and NOTIFY_SOCKET; stdin stays open (a
    stdin scanner with nothing to read)."""

    def __init__(self, tmp: Path, name: str, doc: dict):
        self.dir = tmp / name
        self.dir.mkdir()
        self.conf = write_config(self.dir / "lane.toml", doc)
        self.state_dir = Path(doc["terminal"]["state_dir"])
        self.notify = Notify(self.dir / "notify")
        env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_CONFIG",)}
        env.update(NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        self.t_exec = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(self.conf)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, cwd=str(self.dir))
        self._err: list[bytes] = []
        threading.Thread(target=lambda: self._err.extend(self.proc.stderr), daemon=True).start()
        try:
            self.t_ready = self.notify.wait_for("READY=1", 30.0)
        except TimeoutError:
            self.stop()
            raise SystemExit(f"{name}: no READY=1; its log:\n" + self.log()) from None

    @property
    def ready_s(self) -> float:
        return self.t_ready - self.t_exec

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()

    def log(self) -> str:
        return b"".join(self._err).decode(errors="replace")


def tasks(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (thread name, (voluntary, involuntary) context switches so far, ns on CPU so far)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            runtime = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        switches = (int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"]))
        out[int(tid)] = (fields["Name"].strip(), switches, runtime)
    return out


def idle_profile(pid: int, seconds: float) -> dict:
    """Wakeups per second and % of one core over `seconds`, in total and per thread."""
    before = tasks(pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    after = tasks(pid)
    dt = time.monotonic() - t0
    per_thread = {}
    wakeups = preempted = cpu_ns = 0
    for tid, (name, (voluntary, involuntary), runtime) in after.items():
        _, (v0, i0), r0 = before.get(tid, (name, (0, 0), 0))
        per_thread[f"{name}/{tid}"] = (voluntary - v0) / dt
        wakeups += voluntary - v0
        preempted += involuntary - i0
        cpu_ns += runtime - r0
    return {"wakeups/s": wakeups / dt, "preempted/s": preempted / dt, "cpu %": cpu_ns / 1e9 / dt * 100,
            "threads": per_thread,
            "gone": sorted(set(before) - set(after))}


def python_ceiling(seconds: float) -> dict:
    """An idle Python process that imported what the lane imports: its wakeups and CPU."""
    proc = subprocess.Popen([sys.executable, "-c", f"{LANE_IMPORTS}; import signal, sys; print(flush=True); "
                             "signal.pause()"], stdout=subprocess.PIPE, cwd=str(ROOT))
    try:
        proc.stdout.readline()
        return idle_profile(proc.pid, seconds)
    finally:
        proc.kill()
        proc.wait()


def imports_rss_mb() -> float:
    """VmRSS of a Python process that imported what the lane imports (the floor under the lane's RSS)."""
    proc = subprocess.Popen([sys.executable, "-c", f"{LANE_IMPORTS}; print(flush=True); import signal; signal.pause()"],
                            stdout=subprocess.PIPE, cwd=str(ROOT))
    try:
        proc.stdout.readline()
        return rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def import_ceiling(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", IMPORT_CEILING], check=True)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def watchdog_gap(lane: Lane, since: float) -> float:
    """The longest time without a WATCHDOG=1 from `since` until now."""
    marks = [since] + [t for t in lane.notify.times("WATCHDOG=1") if t > since] + [time.monotonic()]
    return max(b - a for a, b in zip(marks, marks[1:]))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pay(lane: Lane, n: int, start: int = 0) -> None:
    """`n` paid payments through the control socket, one after the other (sandbox: codes ..00 pay)."""
    for i in range(start, start + n):
        reply = control.call(lane.state_dir, {"op": "charge", "order": f"F{i}", "amount_fen": 100 + i % 900,
                                              "code": f"13{i:014d}00"})
        if not reply or reply.get("state") != "paid":
            raise SystemExit(f"payment {i}: {reply}\n{lane.log()[-3000:]}")


class Report:
    def __init__(self):
        self.missed: list[str] = []

    def line(self, figure: str, value: str, against: str, ok: bool | None) -> None:
        verdict = "" if ok is None else ("  ok" if ok else "  MISSED")
        print(f"{figure}: {value}; {against}{verdict}", flush=True)
        if ok is False:
            self.missed.append(figure)


def bench_ready(r: Report, tmp: Path, args) -> None:
    """exec -> READY=1, median of `args.starts`, against the imports alone."""
    ready = []
    for i in range(args.starts):
        lane = Lane(tmp, f"start{i}", lane_doc(tmp / f"start{i}" / "state"))
        ready.append(lane.ready_s)
        lane.stop()
    ceiling = import_ceiling(args.starts)
    ready_s = statistics.median(ready)
    r.line("exec -> READY=1", f"{ready_s * 1000:.0f} ms (median of {len(ready)})",
           f"`{IMPORT_CEILING}` alone {ceiling * 1000:.0f} ms, ratio {ready_s / ceiling:.2f}; "
           f"target <= {READY_TARGET_S * 1000:.0f} ms", ready_s <= READY_TARGET_S)


def bench_idle(r: Report, tmp: Path, args) -> None:
    """Wakeups, CPU and watchdog gaps of an idle lane, [mqtt] disabled then enabled, against an
    idle Python process with the lane's imports."""
    base = python_ceiling(args.idle_s)
    r.line("idle ceiling: python with the lane's imports", f"{base['wakeups/s']:.2f} wakeups/s, "
           f"{base['cpu %']:.3f} % of a core over {args.idle_s:g} s", "the floor", None)
    configs = [("mqtt disabled", None)]
    broker = None
    if not args.no_mqtt:
        from broker import Broker

        broker = Broker(tmp / "broker", lanes=[("S0001", "L01")]).start()
        configs.append(("mqtt enabled, real mosquitto", broker.mqtt_config("S0001", "L01")))
    try:
        for label, mqtt in configs:
            name = "idle-mqtt" if mqtt else "idle"
            lane = Lane(tmp, name, lane_doc(tmp / name / "state", mqtt))
            try:
                time.sleep(0.5 if args.smoke else 2.0)  # startup's own work (connect, first status) done
                prof = idle_profile(lane.proc.pid, args.idle_s)
                gap = watchdog_gap(lane, lane.t_ready)
            finally:
                lane.stop()
            r.line(f"idle wakeups, {label}", f"{prof['wakeups/s']:.2f} /s over {args.idle_s:g} s "
                   f"(and {prof['preempted/s']:.2f} /s preempted)",
                   f"ceiling {base['wakeups/s']:.2f} /s; target <= {WAKEUPS_TARGET:g} /s",
                   prof["wakeups/s"] <= WAKEUPS_TARGET)
            r.line(f"idle CPU, {label}", f"{prof['cpu %']:.3f} % of a core",
                   f"ceiling {base['cpu %']:.3f} %; target <= {CPU_TARGET_PCT:g} %",
                   prof["cpu %"] <= CPU_TARGET_PCT)
            r.line(f"watchdog, {label}", f"longest gap {gap:.1f} s since READY (pings seen: "
                   f"{len(lane.notify.times('WATCHDOG=1'))})", f"WatchdogSec {WATCHDOG_USEC / 1e6:g} s",
                   gap < WATCHDOG_USEC / 1e6)
            if args.threads:
                for thread, rate in sorted(prof["threads"].items(), key=lambda kv: -kv[1]):
                    print(f"    {thread}: {rate:.2f} wakeups/s")
    finally:
        if broker is not None:
            broker.kill()


def bench_footprint(r: Report, tmp: Path, args) -> None:
    """RSS after `args.payments` payments and its growth over the last half; with --threads, the
    RSS at every tenth of them."""
    lane = Lane(tmp, "footprint", lane_doc(tmp / "footprint" / "state"))
    try:
        half = args.payments // 2
        step = max(1, args.payments // 10)
        curve = []
        for start in range(0, args.payments, step):
            pay(lane, min(step, args.payments - start), start)
            curve.append((start + min(step, args.payments - start), rss_mb(lane.proc.pid)))
        rss_half = next(mb for n, mb in curve if n >= half)
        rss_end = curve[-1][1]
        if args.threads:
            print("    RSS by payments: " + ", ".join(f"{n:,}: {mb:.1f}" for n, mb in curve))
    finally:
        lane.stop()
    floor = imports_rss_mb()
    r.line(f"RSS after {args.payments:,} payments", f"{rss_end:.1f} MB",
           f"python with the lane's imports {floor:.1f} MB, ratio {rss_end / floor:.2f}; "
           f"target <= {RSS_TARGET_MB:g} MB", rss_end <= RSS_TARGET_MB)
    r.line(f"RSS growth over the last {args.payments - half:,}", f"{rss_end - rss_half:+.2f} MB",
           f"target <= {GROWTH_TARGET_MB:g} MB", rss_end - rss_half <= GROWTH_TARGET_MB)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for the test suite")
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--payments", type=int, default=10_000)
    p.add_argument("--starts", type=int, default=5, help="starts timed for exec -> READY")
    p.add_argument("--no-mqtt", action="store_true", help="skip the run with a real mosquitto")
    p.add_argument("--threads", action="store_true", help="print the wakeups of each thread")
    p.add_argument("--footprint-only", action="store_true", help="only the RSS figures")
    args = p.parse_args(argv)
    if args.smoke:
        args.idle_s, args.payments, args.starts = 2.0, 200, 2
    r = Report()
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as t:
        tmp = Path(t)
        if not args.footprint_only:
            bench_ready(r, tmp, args)
            bench_idle(r, tmp, args)
        bench_footprint(r, tmp, args)
    if r.missed:
        print("missed: " + ", ".join(r.missed), file=sys.stderr)
    return 1 if r.missed else 0


if __name__ == "__main__":
    sys.exit(main())

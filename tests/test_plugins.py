"""Adapters come from one table per port; out-of-tree ones through the entry-point group
`appliance.platforms`. The plug-in here is a real package, pip-installed into a directory of its
own and found through its dist-info, as a vendor's would be."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.config import ConfigError, from_dict
from appliance.payments import make_provider, providers
from appliance.registry import ENTRY_POINT_GROUP, Registry
from appliance.scan import make_scanner
from conftest import WECHAT_PAID, appliance_cmd, lane_dict, subprocess_env, write_config

PLUGIN = '''
"""An out-of-tree provider: the sandbox, but every charge is also written to a ledger file."""
from dataclasses import dataclass
from pathlib import Path

from appliance.payments import providers
from appliance.payments.sandbox import SandboxOptions, SandboxProvider
from appliance.schema import opt


@dataclass(frozen=True)
class RecorderOptions(SandboxOptions):
    ledger: Path = opt(Path("recorder-ledger.txt"), doc="each charge is appended here")


@providers.register("recorder", RecorderOptions)
class RecorderProvider(SandboxProvider):
    def pay(self, req):
        with open(self.options.ledger, "a") as f:
            f.write(f"{self.name} {req.out_trade_no} {req.amount_fen}\\n")
        return super().pay(req)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """A directory holding the installed plug-in `recorder-pay` (and a broken one): for PYTHONPATH."""
    src = tmp_path_factory.mktemp("recorder-pay")
    (src / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "recorder-pay"
        version = "0.1"

        [project.entry-points."{ENTRY_POINT_GROUP}"]
        recorder = "recorder_pay"
        broken = "broken_pay"

        [tool.setuptools]
        py-modules = ["recorder_pay", "broken_pay"]
        '''))
    (src / "recorder_pay.py").write_text(PLUGIN)
    (src / "broken_pay.py").write_text("import no_such_library_for_payments\n")
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(target.glob("recorder_pay-0.1.dist-info"))
    return str(target)


def _env(plugin_path: str) -> dict:
    path = os.pathsep.join(p for p in (plugin_path, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess_env(PYTHONPATH=path)


@pytest.mark.integration
def test_an_installed_plugin_adapter_takes_payments(tmp_path, plugin_path):
    ledger = tmp_path / "recorded.txt"
    doc = lane_dict(tmp_path / "state")
    doc["providers"]["acme"] = {"kind": "recorder", "ledger": str(ledger), "first_query_after_s": 0.0}
    doc["routing"]["wechat"] = "acme"
    conf = write_config(tmp_path / "appliance.toml", doc)
    r = subprocess.run([*appliance_cmd(), "charge", "--config", str(conf), "--order", "A1", "--amount", "12.34",
                        "--code", WECHAT_PAID, "--json"], capture_output=True, text=True, timeout=60,
                       env=_env(plugin_path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "paid"
    name, out_trade_no, amount = ledger.read_text().split()
    assert (name, amount) == ("acme", "1234") and out_trade_no

    check = subprocess.run([*appliance_cmd(), "check-config", "--config", str(conf)], capture_output=True,
                           text=True, timeout=60, env=_env(plugin_path))
    assert 'kind = "recorder"' in check.stdout and f'ledger = "{ledger}"' in check.stdout


@pytest.mark.integration
def test_fail__a_broken_plugin_is_a_config_error_naming_its_kind(tmp_path, plugin_path):
    doc = lane_dict(tmp_path / "state")
    doc["providers"]["acme"] = {"kind": "broken"}
    conf = write_config(tmp_path / "appliance.toml", doc)
    r = subprocess.run([*appliance_cmd(), "charge", "--config", str(conf), "--order", "A1", "--amount", "1.00",
                        "--code", WECHAT_PAID], capture_output=True, text=True, timeout=60, env=_env(plugin_path))
    assert r.returncode != 0
    assert "providers.acme.kind" in r.stderr and "'broken'" in r.stderr and "broken_pay" in r.stderr
    assert "no_such_library_for_payments" in r.stderr and "Traceback" not in r.stderr


def test_fail__unknown_kinds_name_their_key_and_the_known_ones(tmp_path):
    doc = lane_dict(tmp_path / "state", scanner={"kind": "bluetooth"})
    with pytest.raises(ConfigError) as e:
        from_dict(doc)
    assert e.value.key == "scanner.kind" and "'evdev', 'none', 'serial', 'stdin'" in e.value.reason
    cfg = from_dict(lane_dict(tmp_path / "state"))
    with pytest.raises(ConfigError) as e:  # a factory asked for a kind nobody registered: not a ValueError
        make_provider("x", type(cfg.providers["sandbox"])("paypal", None), tmp_path)
    assert e.value.key == "providers.x.kind" and "must be one of" in e.value.reason
    with pytest.raises(ConfigError) as e:
        make_scanner(type(cfg.scanner)(kind="bluetooth"))
    assert e.value.key == "scanner.kind"


def test_a_registry_loads_a_builtin_adapter_only_when_its_kind_is_asked_for():
    table = Registry("widget", {"later": "appliance.no_such_module"})
    table.register("now")(dict)
    assert {"later", "now"} <= set(table.known())
    assert table.get("now", "w.kind").factory is dict
    with pytest.raises(ConfigError) as e:
        table.get("later", "w.kind")
    assert e.value.key == "w.kind" and "'later' cannot be loaded" in e.value.reason
    with pytest.raises(ValueError, match="already registered"):
        table.register("now")(list)
    assert providers.get("sandbox", "k").options.__name__ == "SandboxOptions"


def test_loading_a_config_imports_no_adapter_it_does_not_use():
    code = ("import sys; from appliance.config import from_dict; "
            "from_dict({'terminal': {'store_id': 'S1', 'terminal_id': 'T1'}, 'scanner': {'kind': 'none'}, "
            "'indicator': {'kind': 'none'}}); "
            "print(sorted(m for m in sys.modules if m.startswith('appliance.') and m.count('.') == 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent).stdout
    assert out.strip() == "[]"

# Two commands on a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test apt-deps bench kill-nightly clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { $(MAKE) apt-deps && $(PYTHON) -m venv $(VENV); }

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Build tools for evdev's C extension (gcc, kernel headers), the venv module, the xkb data
# the keymap tables are checked against, libfaketime (a service process's wall clock stepped), and
# mosquitto with its clients (tests start their own brokers on free ports; the system broker that
# Debian's package starts on 1883 is never used), and systemd's journald, journalctl and systemd-cat
# (tests/test_logs.py runs a journald of its own in a private mount namespace, as root).
apt-deps:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	[ -f /usr/include/linux/input.h ] || missing="$$missing linux-libc-dev"; \
	[ -f /usr/share/X11/xkb/symbols/fr ] || missing="$$missing xkb-data"; \
	ldconfig -p 2>/dev/null | grep -q libxkbcommon.so.0 || missing="$$missing libxkbcommon0"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	{ [ -x /usr/sbin/mosquitto ] && command -v mosquitto_passwd >/dev/null; } || missing="$$missing mosquitto"; \
	command -v mosquitto_sub >/dev/null || missing="$$missing mosquitto-clients"; \
	{ [ -x /lib/systemd/systemd-journald ] && command -v systemd-cat >/dev/null; } || missing="$$missing systemd"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	[ -f "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

demo: apt-deps $(STAMP)
	$(BIN)/appliance demo

test: apt-deps $(STAMP)
	$(BIN)/ruff check appliance tests bench
	$(BIN)/python -m pytest -q

# The kill harness at nightly size (make test runs 200 kill points); KILL_SEED=N for another seed.
kill-nightly: apt-deps $(STAMP)
	KILL_POINTS=$${KILL_POINTS:-2000} $(BIN)/python -m pytest -q -s tests/test_kill_harness.py

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# Two commands on a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test apt-deps bench kill-nightly clean deb image-check lock

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
# (tests/test_logs.py runs a journald of its own in a private mount namespace, as root), and Debian's
# chromium with chromium-driver (tests/test_hq_browser.py drives the head-office web view headless).
apt-deps:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	[ -f /usr/include/linux/input.h ] || missing="$$missing linux-libc-dev"; \
	[ -f /usr/share/X11/xkb/symbols/fr ] || missing="$$missing xkb-data"; \
	ldconfig -p 2>/dev/null | grep -q libxkbcommon.so.0 || missing="$$missing libxkbcommon0"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	{ [ -x /usr/sbin/mosquitto ] && command -v mosquitto_passwd >/dev/null; } || missing="$$missing mosquitto"; \
	command -v mosquitto_sub >/dev/null || missing="$$missing mosquitto-clients"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
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

# bench/lane.py counts syscalls with strace: installed here if missing (the figure is skipped without it).
bench: $(STAMP)
	@command -v strace >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q strace || echo "strace not installed: no syscall counts"; }
	@# every bench runs even when one misses its target; make bench fails if any did
	@failed=""; for b in run ingest lane idle reconcile; do \
	  echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || failed="$$failed $$b"; done; \
	  if [ -n "$$failed" ]; then echo "targets missed in:$$failed" >&2; exit 1; fi

# The Raspberry Pi image's pieces (image/README.md). Both need root: debootstrap and chroot.
# deb: build/appliance_<version>_<arch>.deb, its venv made inside a Debian bookworm build root
# (ARCH=arm64 for the Pi, with qemu-user-static). image-check: that package installed into a fresh
# bookworm root (build/image-root/), its units, user, modes, udev rule, config and first boot checked.
deb:
	image/build.sh deb

image-check:
	image/check.sh

# Re-pin the image's Python dependencies (hashes of every file, CPython 3.11, any platform) after a
# change to pyproject.toml's dependencies or image/*requirements.in.
lock: $(STAMP)
	$(BIN)/pip install --quiet 'uv>=0.5,<1'
	$(BIN)/uv pip compile -q pyproject.toml image/requirements.in --universal --python-version 3.11 \
	  --generate-hashes --custom-compile-command "make lock" -o image/requirements.lock
	$(BIN)/uv pip compile -q image/build-requirements.in --universal --python-version 3.11 \
	  --generate-hashes --custom-compile-command "make lock" -o image/build-requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

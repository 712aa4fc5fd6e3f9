# The two commands of the README:
#   make demo   tiny model -> ONNX -> Triton repository -> local Triton -> two images (CPU, offline)
#   make test   the test suite, against a real Triton server
# Both create the virtual environment first if it is missing or out of date.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test images engines clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

demo: venv
	$(BIN)/python scripts/quickstart.py

test: venv
	$(BIN)/pytest

# The production path (needs Docker, an NVIDIA GPU and the NVIDIA container toolkit):
images: venv
	$(BIN)/python scripts/build_docker_images.py

engines: venv
	$(BIN)/python scripts/build_tensorrt_engines.py --docker

clean:
	rm -rf $(VENV) models onnx outputs

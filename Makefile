# `make demo` and `make test` set everything up on a fresh machine: a virtual environment with the
# package, PyTorch (TORCH, default the 2.13.0 wheel), and Debian's Fashion-MNIST when running as root.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
FMNIST ?= /usr/share/datasets/fashion-mnist
PY := $(VENV)/bin/python

.PHONY: demo demo-text demo-video test data env clean gpu-check

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps torch-fidelity pytorch-fid  # reference code for the tests; no torchvision
	touch $@

data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST)/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST: $(FMNIST)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four IDX files in a folder and pass data.root=FOLDER"; \
		exit 1; \
	fi

demo: env data
	$(VENV)/bin/sprintdit demo

demo-text: env data  # text-to-image: captioned 2x2 layouts of garments (sprintdit/configs/fashion_mnist_text.yaml)
	$(VENV)/bin/sprintdit demo --config fashion_mnist_text --out runs/demo-text

demo-video: env data  # video: moving Fashion-MNIST clips (sprintdit/configs/fashion_mnist_video.yaml)
	$(VENV)/bin/sprintdit demo --config fashion_mnist_video --out runs/demo-video

test: env
	-@$(MAKE) --no-print-directory data
	$(PY) -m pytest -q
	scripts/check_wheel.sh $(PY) "$(TORCH)"

gpu-check:  # on a GPU machine (its own Python; wheels in .whl/ for what it lacks): see scripts/gpu_check.sh
	scripts/gpu_check.sh --out gpu_check

clean:
	rm -rf $(VENV) runs *.egg-info

# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# TORCH_SPEC is overridable, e.g.  make test TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT   ?= runs/demo
PY          = $(VENV)/bin/python
STAMP       = $(VENV)/.installed

# the ecosystem checks (exports through plain transformers' AutoProcessor, the lmms-eval plugin under
# lmms-eval itself) need torchvision, which does not import beside the CPU torch 2.13 build; they run in a
# second venv (torch 2.14.1 + torchvision 0.29.1, on this machine's disk) with lmms-eval
ECO_VENV       ?= .venv-ecosystem
ECO_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ECO_STAMP       = $(ECO_VENV)/.installed

.PHONY: install demo test test-ecosystem clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gasp demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

$(ECO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(ECO_VENV)
	$(ECO_VENV)/bin/python -m pip install --upgrade pip
	$(ECO_VENV)/bin/python -m pip install $(ECO_TORCH_SPEC)
	$(ECO_VENV)/bin/python -m pip install -e ".[dev]"
	# lmms-eval without its full dependency set (which would replace torch): only what its imports need;
	# its evaluator needs filelock < 4; OpenCV reads fps / frame counts for videomme_w_subtitle, as upstream does
	$(ECO_VENV)/bin/python -m pip install --no-deps "lmms-eval==0.7.3"
	$(ECO_VENV)/bin/python -m pip install loguru sacrebleu evaluate pytz tenacity pytablewriter zstandard "filelock<4" \
		opencv-python-headless
	touch $(ECO_STAMP)

test-ecosystem: $(ECO_STAMP)
	$(ECO_VENV)/bin/python -m pytest -q -m ecosystem

clean:
	rm -rf $(VENV) $(ECO_VENV) runs build *.egg-info src/*.egg-info

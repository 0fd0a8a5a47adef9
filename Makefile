# Two commands do everything on a fresh machine:
#   make run    create .venv, then run the whole pipeline on the embedded default (params/tiny.yaml)
#   make test   create .venv, then run the test suite (includes every stage end to end on params/smoke.yaml)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/tiny.yaml
STAGES ?=

.PHONY: setup run test smoke lab clean-outputs

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'fgaif.pth').write_text(str(pathlib.Path('.').resolve()) + '\n')"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m fgaif_utils.pipeline $(PARAMS) $(if $(STAGES),--stages $(STAGES),)

smoke: setup
	$(PY) -m fgaif_utils.pipeline params/smoke.yaml

test: setup
	$(PY) -m pytest -q tests

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# Two commands do everything on a fresh machine: `make book` and `make test`.
# Both create .venv from requirements.txt when it is missing or older than it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NB     ?= $(sort $(wildcard book/[0-9]*.ipynb))
JB_FLAGS := -W -n --keep-going

.PHONY: all book test unit nbval html-check execute lab env clean

all: test

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	@touch $(STAMP)

env: $(STAMP)

## make book: build the HTML book into _build/html (warnings are errors)
book: $(STAMP)
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	@echo "The book: $(CURDIR)/_build/html/index.html"

## make test: library tests, every chapter under nbval, the book build and its browser check
# nbval's per-cell timeout (600 s, pyproject.toml) equals make execute's: a guard against a hung
# cell, far above any chapter's budget (90 s per chapter, 4 min when it trains).
test: $(STAMP)
	$(MAKE) book
	$(BIN)/python -m pytest --nbval -q tests book

## make unit: the library's unit tests only (fast)
unit: $(STAMP)
	$(BIN)/python -m pytest -q tests

## make nbval: re-run every chapter and compare with the stored outputs
nbval: $(STAMP)
	$(BIN)/python -m pytest --nbval -q book

## make execute [NB=book/01_set_prediction.ipynb]: re-run chapters headlessly, top to bottom, in place
execute: $(STAMP)
	@for nb in $(NB); do \
	  echo "executing $$nb"; \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 --ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
	done

## make lab: open the chapters in JupyterLab with the book's environment
lab: $(STAMP)
	$(BIN)/jupyter lab book/

clean:
	rm -rf _build

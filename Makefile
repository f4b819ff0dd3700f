# Two entry points for a fresh machine: `make demo` and `make test`.
# Exact pins live here; setup.py keeps ranges so the package also installs beside other torch builds.
# VENV may point outside the clone (CI keeps one per set of pins in a cache directory).

PYTHON ?= python3
VENV ?= .venv
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
TEST_ARGS ?=

PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.conadv-deps

.PHONY: install demo test fuzz lint bench study study-distill clean

$(DEPS_STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[dev,dali,onnx,trackers,study]'
	# AutoAttack (conadv-eval --autoattack): torchattacks pins requests~=2.25.1, which would
	# downgrade requests for everything else; what it imports is installed already
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $@

# The editable install is re-pointed at this clone every time (cheap), since a cached venv
# may have been built from another clone.
install: $(DEPS_STAMP)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

# ConAdv (tau = 1) on the digits, then the same run without adversarial training, so the
# clean and PGD accuracies of both are printed one above the other; then a report of the two.
# Two threads on any machine: the README quotes the numbers it prints, which depend on the
# thread count (CPU kernels reduce in another order with another).
demo: install
	OMP_NUM_THREADS=2 $(VENV)/bin/conadv-train --config configs/demo.yaml log.run_dir=runs/demo \
		log.overwrite=true
	OMP_NUM_THREADS=2 $(VENV)/bin/conadv-train --config configs/demo.yaml adv.enabled=false \
		log.run_dir=runs/demo_vanilla log.overwrite=true
	$(VENV)/bin/conadv-report runs/demo runs/demo_vanilla --out runs/demo_report

# two workers: the suite's many multi-process tests wait on process start-up and rendezvous.
# The suite's line coverage of conadv/ (torchrun ranks and CLIs in subprocesses too) is
# reported, and the whole suite checks that docs/UNEXECUTED.md names every line it never runs.
test: install
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(CURDIR)/.coverage $(PY) -m coverage run -m pytest -q -n 2 --dist loadgroup \
		$(TEST_ARGS)
	$(PY) -m coverage combine -q
	$(PY) -m coverage report --precision=1 | tail -n 1
	$(if $(TEST_ARGS),,$(PY) -m tests.unexecuted --check)

# The fuzzer at every door (tests/fuzz.py): 10,000 generated inputs through the entry points,
# a table by door and outcome (a short budget of it runs in `make test`)
fuzz: install
	$(PY) -m tests.fuzz --cases 10000

# CPU benchmark suite (< 10 min on 2 cores) -> benchmarks/results/<machine>-<date>.json
bench: install
	$(PY) -m benchmarks.run_all

# The matched-fit study on MNIST at 28 px (design and rules: docs/study_rules.md; 40-85 minutes
# on 2 cores; finished runs are cached in .study-cache, so an interrupted study resumes)
# -> docs/results/
study: install
	$(PY) -m benchmarks.matched_fit_study --out docs/results

# Distillation on the digits: three teachers into a narrow student (~9 minutes) -> docs/results/
study-distill: install
	$(PY) -m benchmarks.distill_study --out docs/results

lint: install
	$(PY) -m ruff check conadv benchmarks tests

clean:
	rm -rf runs .pytest_cache .ruff_cache

# Every target creates its own environment in $(VENV) on a fresh machine.
# torch==2.13.0 is installed first: it is the CPU build that lies on this disk; the
# package itself only asks for torch>=2.1.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.proxrank-installed

.PHONY: test demo bench bench-zero-shot bench-schedules bench-distributed bench-recovery bench-lm bench-pruning bench-threshold lint clean

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check proxrank tests benchmarks examples

test: lint
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m proxrank demo

bench: $(STAMP)
	$(PY) benchmarks/prox_cost.py

# one-shot compression accuracy (no fine-tuning) per metric on sklearn digits
bench-zero-shot: $(STAMP)
	$(PY) benchmarks/zero_shot.py

# accuracy at equal compression: one-shot truncation vs ISVT vs scheduled rank reduction
bench-schedules: $(STAMP)
	$(PY) benchmarks/schedules.py

# the prox shared across ranks: per-rank work, time and bytes for 1 and 2 gloo processes
bench-distributed: $(STAMP)
	$(PY) benchmarks/distributed.py

# deep linear networks on matrix recovery: original vs compressed (spectral init) vs ProxRank
bench-recovery: $(STAMP)
	$(PY) benchmarks/matrix_recovery.py

# character-level GPT-2 on the license texts: truncation + fine-tune vs ProxRank at equal steps
bench-lm: $(STAMP)
	$(PY) benchmarks/lm.py

# digits MLP: dense vs ProxRank vs NN-BCD (tensor-train, pruning): accuracy, size, time
bench-pruning: $(STAMP)
	$(PY) benchmarks/pruning_tt.py

# tau_lr = current / initial / cumulative under warm-up + cosine decay: lr, tau, rank, accuracy
bench-threshold: $(STAMP)
	$(PY) benchmarks/threshold_semantics.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Two commands for a new user: `make demo` (set up, then back up, change, back up again and
# mount a sample disk) and `make test` (set up, lint, then run the whole test suite; CI runs
# exactly this). `make test-fast`: the pure and in-process tiers without the slow tests.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-s3 test test-fast lint bench docs clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

# the object-storage demo: a private S3 service (Swift), a deduplicating repository in it,
# a mount from the bucket and a single-file restore, an offsite copy
demo-s3: setup
	@bash scripts/demo-s3.sh

# lint first: it takes seconds and a failure fails the run
test: lint
	@bash scripts/test.sh

test-fast: setup
	@bash scripts/test.sh -m "(pure or inproc) and not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python tests/bench/run.py $(BENCH_ARGS)

# Regenerate the completions, man page and CLI reference from the CLI's parser, and
# docs/json.md from the --json schema.
docs: setup
	$(BIN)/python scripts/docgen.py bash > contrib/completion/diskrsync.bash
	$(BIN)/python scripts/docgen.py zsh > contrib/completion/_diskrsync
	$(BIN)/python scripts/docgen.py man > contrib/diskrsync.1
	$(BIN)/python scripts/docgen.py markdown > docs/cli.md
	$(BIN)/python scripts/docgen.py json > docs/json.md

clean:
	rm -rf $(VENV) demo-work demo-work-s3 .pytest_cache .mypy_cache .ruff_cache

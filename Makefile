# The two front-door commands. Each sets up everything it needs first (scripts/setup.sh).
.PHONY: setup demo test lint

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/loramesh demo $(ARGS)

test:
	./scripts/setup.sh --browser
	.venv/bin/python -m pytest $(ARGS)

lint: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .

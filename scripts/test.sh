#!/usr/bin/env bash
# The README's test command (after setup): lint, layout rules, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
python3 -m pytest -q tests

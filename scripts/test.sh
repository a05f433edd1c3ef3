#!/usr/bin/env bash
# The README's test command (after setup): lint, layout rules, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
# The slowest tests are listed last: CI has 20 minutes for setup and all of this.
python3 -m pytest -q --durations=20 tests

"""The fault tests reuse tests/pd_system.py (the served PD system) from one directory up."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

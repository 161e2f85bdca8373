"""Lets the tests here import the shared schema list (``from schemas import SCHEMAS``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

"""Run every benchmark script in this folder (what `make bench` does); each prints JSON lines."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).parent
failed = 0
for script in sorted(here.glob("*.py")):
    if script.name != Path(__file__).name:
        failed += subprocess.call([sys.executable, str(script)]) != 0
sys.exit(1 if failed else 0)

"""`python -m faceforge` runs the command line (also what torchrun launches)."""

from faceforge.cli import main

raise SystemExit(main())

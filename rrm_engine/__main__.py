"""python -m rrm_engine ... (the same as the `rrm-engine` console script): see rrm_engine/cli.py."""
from rrm_engine.cli import main

raise SystemExit(main())

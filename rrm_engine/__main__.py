"""python -m rrm_engine ... (the same as the `rrm-engine` console script): see rrm_engine/cli/main.py."""
from rrm_engine.cli.main import main

raise SystemExit(main())

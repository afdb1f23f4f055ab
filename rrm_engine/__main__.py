"""python -m rrm_engine ...: see rrm_engine/cli.py."""
from rrm_engine.cli import main

raise SystemExit(main())

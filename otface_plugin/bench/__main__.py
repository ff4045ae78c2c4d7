"""``python -m otface_plugin.bench``."""
import sys

from otface_plugin.bench.cli import main

sys.exit(main())

"""``python -m dkm_param``: the same command line as ``dkm-param``."""

import sys

from .cli import main

sys.exit(main())

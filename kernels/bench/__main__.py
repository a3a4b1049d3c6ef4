"""`python -m dsforget.kernels.bench [--sizes 1M,4M] [--csv FILE] [--tiny]`: see flat.py."""

import sys

from .flat import main

sys.exit(main())

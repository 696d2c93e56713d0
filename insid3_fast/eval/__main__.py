"""``python -m insid3_fast.eval`` (also under ``torchrun --nproc-per-node G -m insid3_fast.eval``)."""

import sys

from .cli import main

sys.exit(main())

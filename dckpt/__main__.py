"""``python -m dckpt``: the dckpt command (``torchrun -m dckpt bench ...`` runs it on ranks)."""

import sys

from dckpt.cli import main

sys.exit(main())

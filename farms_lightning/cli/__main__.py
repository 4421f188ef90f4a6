"""``python -m farms_lightning.cli``: the ``farms-lightning`` command (as torchrun launches it)."""

import sys

from farms_lightning.cli.commands import main

sys.exit(main())

"""``python -m torchtune_ops``: the ``torchtune-ops`` command line (see ``cli``)."""
import sys

from .cli import main

sys.exit(main())

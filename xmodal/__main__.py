"""``python -m xmodal`` and ``accelerate launch -m xmodal``."""
import sys

from xmodal.cli import main

sys.exit(main())

"""``python -m d2seg.model_zoo list | download NAME... [--to DIR] [--pin]`` (see cli.py)."""
import sys

from .cli import main

sys.exit(main())

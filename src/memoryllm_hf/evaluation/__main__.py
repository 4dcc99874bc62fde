"""`python -m memoryllm_hf.evaluation TASK ...` = `memoryllm-hf eval TASK ...`."""

import sys

from .cli import main

sys.exit(main(["eval", *sys.argv[1:]]))

"""``python -m cipherdm_torch.training <train|sample|account|bench> ...``"""

import sys

from cipherdm_torch.errors import run_main

from .cli import main

if __name__ == "__main__":
    sys.exit(run_main(lambda a: main(a, "python -m cipherdm_torch.training"), sys.argv[1:]))

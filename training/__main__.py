"""``python -m cipherdm_torch.training <train|sample|account|bench> ...``"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

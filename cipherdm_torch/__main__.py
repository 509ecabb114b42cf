import sys

from cipherdm_torch.cli import main

sys.exit(main())

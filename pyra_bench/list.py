"""``python -m pyra_bench.list backbones|methods|tasks|experiments|options|recipe|launchers``: as :mod:`pyra_bench.info`."""

import sys

from .info import main

if __name__ == "__main__":
    sys.exit(main())

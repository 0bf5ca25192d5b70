"""Layer benchmark script; same as `structlin bench`. See src/structlin/bench.py."""

import sys

from structlin_lab.bench import main

if __name__ == "__main__":
    sys.exit(main())

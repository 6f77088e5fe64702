import sys

from adaserve.cli import main

sys.exit(main())

import sys

from detkd.cli import main

sys.exit(main())

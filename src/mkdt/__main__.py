import sys

from mkdt.cli import main

sys.exit(main())

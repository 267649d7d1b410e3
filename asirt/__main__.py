import sys

from asirt.cli import main

sys.exit(main())

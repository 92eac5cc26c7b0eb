"""`python -m fedpriv COMMAND ...`: the `fedpriv` console command without an installed script."""

import sys

from fedpriv.cli import main

sys.exit(main())

import sys

from medimb.cli import main

sys.exit(main())

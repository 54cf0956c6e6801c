import sys

from memreason.cli import main

sys.exit(main())

import sys

from onetoken.cli import main

sys.exit(main())

import sys

from tidar_export.cli import main

sys.exit(main())

import sys

from npformer.cli import main

sys.exit(main())

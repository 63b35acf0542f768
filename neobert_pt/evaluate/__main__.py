import sys

from neobert_pt.evaluate.cli import main

sys.exit(main())

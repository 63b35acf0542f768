"""``python -m neobert_pt.data prepare|verify ...`` (see :mod:`neobert_pt.data.prepare`)."""

from neobert_pt.data.prepare import main

raise SystemExit(main())

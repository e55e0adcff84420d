"""``python -m mlnb.bench``: the same as ``mlnb bench``."""

from .command import main

raise SystemExit(main())

"""``opera-consumer ARGS`` in a Python where the package of the optional extra (asyncpg for
``postgres``) cannot be imported, as after a plain ``pip install opera-consumer``:

    python tests/without_extras.py run --config CONFIG
"""

from __future__ import annotations

import sys

for module in ("asyncpg",):
    sys.modules[module] = None  # type: ignore[assignment]  # import: ImportError; find_spec: None

from consumer.cli import main  # noqa: E402  # after the block above

sys.exit(main())

"""The ``mergestudio`` command: the app without arguments, the engine's CLI with them.

This lives in ``app`` because only ``app`` may import Qt; ``core.cli`` stays
headless. Neither Qt nor torch is imported before it is needed, so
``mergestudio methods`` starts as fast as the engine allows.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        from app.main import main as gui_main

        return gui_main()
    from core.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

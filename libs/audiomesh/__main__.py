"""The ``audiomesh`` console script and ``python -m audiomesh``.

The CLI's own imports (grpc, protobuf, the commands) take a moment; a Ctrl-C while they run
would escape ``audiomesh.cli.main``'s handler as a traceback. This module imports nothing
heavy itself, so the handler below is in place before any of that starts.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run the CLI on ``sys.argv``; Ctrl-C at any point ends it with 130 and no traceback."""
    try:
        from audiomesh.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

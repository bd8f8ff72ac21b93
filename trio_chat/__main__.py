"""``python -m trio_chat``: the same as the ``trio-chat`` command."""

from trio_chat.cli import main

raise SystemExit(main())

"""``python -m adalora_fast``: the ``adalora-fast`` command (``demo``, ``bench``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m otlab``: see `otlab.cli`."""

from otlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

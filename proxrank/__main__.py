"""``python -m proxrank COMMAND [options]``: see :mod:`proxrank.cli`."""

from .cli import main

if __name__ == "__main__":
    main()

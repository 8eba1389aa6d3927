"""``python -m aipipe``: the command line, as the ``aipipe`` script runs it."""

from aipipe.cli import main

if __name__ == "__main__":
    main()

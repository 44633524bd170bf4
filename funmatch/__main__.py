"""`python -m funmatch ...` (what torchrun and TrainJob pods run): the command line."""

from funmatch.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

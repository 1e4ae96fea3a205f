"""Entry point of ``python -m attngate_ext.evaluate`` (the command lives in :mod:`attngate_ext.evaluation.evaluate`)."""

from .evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Entry point of ``python -m attngate_ext.train`` (the command lives in :mod:`attngate_ext.training.train`)."""

from .training.train import main

if __name__ == "__main__":
    raise SystemExit(main())

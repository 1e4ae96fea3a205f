"""Entry point of ``python -m attngate_ext.lm_eval`` (the command lives in :mod:`attngate_ext.evaluation.lm_eval`)."""

from .evaluation.lm_eval import main

if __name__ == "__main__":
    raise SystemExit(main())

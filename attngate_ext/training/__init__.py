"""The training wing: eviction loss, training data, and the ``python -m attngate_ext.train`` command."""

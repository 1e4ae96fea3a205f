"""Helpers the tests share: state makers, tiny models, shared checks. Never imports a test file."""

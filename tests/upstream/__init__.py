"""The opt-in differential suite against the official code (README.md). A package so that its conftest.py
does not shadow tests/conftest.py (both would be the module `conftest`)."""

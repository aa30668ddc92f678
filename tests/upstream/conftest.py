"""Every test under tests/upstream is marked `upstream` and skips, saying how to run it, unless $SEGDA_UPSTREAM
names the folder of official checkouts (tests/upstream/README.md). The measured differences are merged into
tests/upstream/parity_results.json at the end of the session."""
import os
from pathlib import Path

import pytest

from upstream import harness

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    skip = None if os.environ.get(harness.ENV) else pytest.mark.skip(reason=f"{harness.ENV} not set: "
                                                                         + harness.HOW_TO_RUN)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.upstream)
            if skip:
                item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    harness.write_results()

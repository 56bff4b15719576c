"""Test-wide settings: telemetry off and Prefect state in a temporary folder."""

import os
import tempfile
from collections.abc import Iterator

import pytest

# Set before Prefect or MLflow is imported by any test module.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="defect-loop-prefect-"))
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test harness (temporary server + database) for the whole session.

    Several harnesses in one process hang: the second one's teardown waits forever while
    draining its log and event workers. Every test module that runs flows uses this one.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield

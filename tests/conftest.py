"""Test-wide settings: telemetry off and Prefect state in a temporary folder."""

import os
import tempfile

# Set before Prefect or MLflow is imported by any test module.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="defect-loop-prefect-"))
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

"""Local services: the Label Studio server in its own venv (`labelstudio`), the Prefect server
(`prefect_server`), and the detached-process machinery they share (`process`). Nothing here runs
at import time and nothing imports prefect.
"""

from loop.services.labelstudio import (
    CACHE_DIR,
    DEFAULT_USERNAME,
    DEFAULT_VENV_DIR,
    LABEL_STUDIO_VERSION,
    WEBHOOK_ENV,
    Credentials,
    LabelStudioService,
    install_label_studio,
    load_or_create_credentials,
)
from loop.services.prefect_server import PrefectService, TemporaryPrefectServer
from loop.services.process import free_port

__all__ = [
    "CACHE_DIR",
    "DEFAULT_USERNAME",
    "DEFAULT_VENV_DIR",
    "LABEL_STUDIO_VERSION",
    "WEBHOOK_ENV",
    "Credentials",
    "LabelStudioService",
    "PrefectService",
    "TemporaryPrefectServer",
    "free_port",
    "install_label_studio",
    "load_or_create_credentials",
]

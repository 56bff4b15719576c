"""The `defect-loop` command line: the only part of `loop` that imports `flows` and Prefect.

`app` is the console script's entry point (``defect-loop = "loop.cli:app"``). One module per
command group: `main` (the root app and the steps of a cycle), `datasets`, `deploy` (deploy and
monitor), `labelstudio`, `report`, `review` (review-labels), `serve` (serve and prefect-server), `services`, `sim`
(simulate and import), `demo`; `common` holds what they share (console, --config, clean
failures, the Prefect environment).
"""

from loop.cli.main import app

__all__ = ["app"]

"""Prefect flows: thin orchestration over `loop/`. Each task wraps one I/O boundary."""

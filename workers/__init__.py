"""The queue side of adqueue: the Celery app, its thin tasks and the per-process runtime."""

"""Running one piece of work under a lease: claim it, run the pipeline, complete it guarded.

The same runners serve a Celery worker (adqueue.workers.tasks) and this process (inline.py).
"""

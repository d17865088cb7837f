"""adqueue: train visual anomaly detectors on defect-free images, score image dumps in batches.

The package imports without Celery; the queue side lives in the top-level `workers` package.
"""

__version__ = "0.1.0"

"""Log records that repeat part of a job's outcome, marked so a terminal shows the outcome once.

A worker's log is where an operator reads what happened to each job, training's warnings
included. A terminal that ran the job itself (the embedded default) prints the outcome from SQL
once the job has ended (the trained model, its warnings, its self-check), so its log leaves these
records out instead of printing each twice, the first time in the middle of the progress bars.
"""

from __future__ import annotations

import logging

_MARK = "adqueue_outcome"
OUTCOME = {_MARK: True}  # logger.warning(..., extra=OUTCOME)


def is_outcome(record: logging.LogRecord) -> bool:
    return bool(getattr(record, _MARK, False))

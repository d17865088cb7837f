"""Settings of score and evaluate jobs that are checked when they are submitted.

Apart from scoring.py, which needs torch, so that `adqueue score` with a broker checks them
without importing it.
"""

from __future__ import annotations

# Which images get a JPEG heat-map overlay: the flagged ones, every one, or none.
HEATMAP_MODES = ("flagged", "all", "none")

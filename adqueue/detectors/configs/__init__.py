"""Each detector's settings (a Config dataclass) and their checks, one module per detector, free
of torch: listing settings (`adqueue detectors`) and refusing bad ones when a job is submitted
must not import the detector that will run it. The detector modules import their Config here."""

"""Performance analysis: machine models, a roofline per kernel, and a discrete-event simulator of
a plan's programs.  An analysis stage after plan and generate: it reads the plan, the kernels'
launch geometry and tiles, and the build's manifest, and changes none of them."""


class PerfError(Exception):
    """A machine, link, calibration or schedule the analysis cannot use (a user's mistake)."""

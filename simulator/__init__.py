"""servesim: a discrete-event LLM-serving simulator."""
__version__ = "0.1.0"


def load_run(path):
    """A report folder as pandas data: `.requests` (one row per request), `.summary` (summary.json), `.ok`.
    See simulator/loader.py."""
    from .loader import load_run as _load
    return _load(path)

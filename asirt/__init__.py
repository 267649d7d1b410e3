"""asirt: measure SMT sibling synchronization with pinned processes over shared memory.

Importing the package imports nothing heavy (``python -m asirt`` installs its signal
handling first: asirt/__main__.py); ``asirt.AsirtError`` is loaded on first use.
"""


def __getattr__(name: str) -> object:
    if name == "AsirtError":
        from asirt.errors import AsirtError
        return AsirtError
    raise AttributeError(f"module 'asirt' has no attribute {name!r}")

"""The one base exception of asirt, and the layout's own errors.

It lives here, at the bottom of the dependency stack, so that ``shm_layout`` can raise
errors the CLI catches without importing ``asirt``; ``asirt.errors`` re-exports it.
Every subclass keeps its constructor arguments in ``args`` so it pickles (a worker can
report one to the parent) and builds its message from its fields.
"""
from __future__ import annotations


class AsirtError(Exception):
    """Base of every error asirt raises on purpose. ``exit_code`` is the CLI's status."""

    # 1: an internal error (a bug, or the host misbehaved) unless a subclass says it is bad
    # input (2): BadInput, FeatureMissing, and a segment that is foreign, corrupt or missing.
    exit_code = 1

    def __str__(self) -> str:  # subclasses override message()
        return self.message()

    def message(self) -> str:
        return " ".join(str(a) for a in self.args)


class LayoutMismatch(AsirtError):
    """An attach found a segment whose header does not match what this build expects."""

    exit_code = 2  # a foreign or corrupt segment named by the user: bad input

    def __init__(self, segment: str, what: str, expected: object, found: object) -> None:
        super().__init__(segment, what, expected, found)
        self.segment, self.what, self.expected, self.found = segment, what, expected, found

    def message(self) -> str:
        return (f"shared-memory segment {self.segment!r}: {self.what} mismatch "
                f"(expected {self.expected!r}, found {self.found!r}); it was not made by this "
                f"asirt build for this user. Run 'asirt cleanup' to reclaim stale segments, "
                f"or pass the name of a segment created by a live asirt run")


class SegmentMissing(AsirtError):
    exit_code = 2  # bad input: the name given does not exist

    def __init__(self, segment: str) -> None:
        super().__init__(segment)
        self.segment = segment

    def message(self) -> str:
        return (f"shared-memory segment {self.segment!r} does not exist; "
                f"it may have been unlinked by its creator (list them with 'ls /dev/shm')")


class ShmUnavailable(AsirtError):
    """/dev/shm cannot hold the region: full, read-only, or not ours to write."""

    exit_code = 2  # the host must be fixed before any run can start, like FeatureMissing

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(path, problem, fix)
        self.path, self.problem, self.fix = path, problem, fix

    def message(self) -> str:
        return f"{self.path} {self.problem}; {self.fix}"


class NotOurs(AsirtError):
    """A file under an asirt name that this user's asirt cannot have made (a directory, a
    link, another user's file): hygiene leaves it alone and says why."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why

    def message(self) -> str:
        return self.why

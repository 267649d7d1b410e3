"""``python -m asirt`` and the ``asirt`` console script.

Ctrl-C and SIGTERM are handled before anything heavy is imported (numpy and the rest take
a good part of a second on a loaded machine): until ``main`` installs its own handling
nothing exists that needs cleaning up, so a signal ends the process at once, quietly, with
status 130. (The interpreter's own start-up, before this module runs, is beyond reach.)
"""
import os
import signal
import sys


def _interrupted_early(signum: int, frame: object) -> None:
    os.write(2, b"\nasirt: interrupted\n")
    os._exit(130)


def entry() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _interrupted_early)
    from asirt.cli import main, pause_for_tests
    status = main(restore_signals=False)
    # The status is chosen: a signal from now on must not change it. The interpreter's
    # finalization puts SIG_DFL back for every signal with a Python handler (a SIGTERM then
    # made it 143), but leaves an ignored one ignored.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    pause_for_tests("exit")
    sys.exit(status)


if __name__ == "__main__":
    entry()

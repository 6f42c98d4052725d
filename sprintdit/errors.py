"""The exceptions a user sees as one line (`error: <message>` and a non-zero exit code), and warnings as one line."""

import sys

# torch.load(weights_only=True) refused a file; torch's own message goes on to suggest weights_only=False, which
# would run whatever code the file carries
PICKLE_REFUSED = "holds pickled Python objects beyond tensors; refusing to load it (sprintdit never unpickles code)"


class UserError(Exception):
    """Bad input (config, path, checkpoint, option) or a problem the user can fix; exit code 2."""

    exit_code = 2


class Diverged(UserError):
    """A non-finite loss or gradient norm stopped training; nothing after the last finite checkpoint was written."""

    exit_code = 3


class Stopped(UserError):
    """A signal (Ctrl-C, SIGTERM, SIGUSR1) stopped training after a checkpoint was saved; exit code 128 + signal,
    as a shell reports a process that a signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


_warned: set[str] = set()


def warn(message: str) -> None:
    """One line `warning: <message>` on stderr, once per process for the same message."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)

"""One kind of error for bad input, and the guard that turns it into a one-line message."""

import functools
import sys


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): printed as one line, exit status 2."""


def exit_on_user_error(fn):
    """Entry-point decorator: a UserError becomes `error: ...` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper

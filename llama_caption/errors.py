"""One kind of error for bad input, and the guard that turns it into a one-line message.

Under torchrun the launcher ends a failed job with its own report; the guard also writes the
message into the error file torchrun names (TORCHELASTIC_ERROR_FILE), so that report's last
line, its root cause, is the same one-line error rather than "<N/A>".
"""

import functools
import json
import os
import sys
import time

USER_ERROR_EXIT = 2  # bad input; 1 stays for crashes (and is what torchrun itself returns)


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): printed as one line, exit status 2."""


def report_user_error(message: str) -> None:
    line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": info}}, f)
        except OSError:
            pass  # the message is on stderr already


INTERRUPTED_EXIT = 130  # as a shell reports a command stopped by SIGINT


def exit_on_user_error(fn, interrupted: str = "what was already written is kept"):
    """Entry-point decorator: a UserError becomes `error: ...` on stderr and exit status 2; ^C
    becomes one line (`interrupted`: what the user can do next) and exit status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            report_user_error(str(e))
            sys.exit(USER_ERROR_EXIT)
        except KeyboardInterrupt:
            print(f"\ninterrupted (Ctrl-C): {interrupted}", file=sys.stderr, flush=True)
            sys.exit(INTERRUPTED_EXIT)

    return wrapper

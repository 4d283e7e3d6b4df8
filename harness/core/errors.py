"""Errors shared by every module; torch-free so the Snakefile can import it cheaply."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data): printed as one line, no traceback."""


#: the seeds every command accepts (torch and numpy seed with 64 and 32 bits; a config's seeds too)
SEED_MAX = 2**32 - 1


def check_int(name: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high], or one UserError line naming the option and the range
    (a command-line override passes the same checks as the config it overrides)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


#: the environment variable naming a file descriptor open on the console (the workflow's jobs
#: redirect stdout and stderr to their log; a full disk can leave that log empty)
CONSOLE_FD_ENV = "DIDBENCH_CONSOLE_FD"
#: shell prefix of every workflow job: fd 3 keeps the console's stderr past the log redirection
CONSOLE_PREFIX = f"exec 3>&2; export {CONSOLE_FD_ENV}=3; "


def report_error(line: str) -> None:
    """Print one error line to stderr and, for a workflow job whose stderr is its log file, to the
    console too: the reason of a failure must reach a person even when the log cannot be written."""
    import os
    import sys

    written = True
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        written = False
    fd = os.environ.get(CONSOLE_FD_ENV)
    if not fd or not fd.isdigit():
        return
    try:
        console, err = os.fstat(int(fd)), os.fstat(sys.stderr.fileno())
        if written and (console.st_dev, console.st_ino) == (err.st_dev, err.st_ino):
            return   # stderr is the console already
        os.write(int(fd), (line + "\n").encode("utf-8", "replace"))
    except (OSError, ValueError):
        pass

"""The one exception type for bad user input. The CLI prints it as a single line and exits 2."""


class InputError(ValueError):
    """Input that the product cannot use: a missing file, a wrong shape, a bad field.

    The message names the file, row or field and what was expected.
    """


def check_options(*checks: tuple[str, object, bool, str]) -> None:
    """Raise one line for the first (flag, value, is valid, what is expected) that fails:
    `--model.width must be >= 1, got 0`."""
    for flag, value, ok, expected in checks:
        if not ok:
            raise InputError(f"--{flag} must be {expected}, got {value}")


def require_file(path, what: str, flag: str = "") -> None:
    """`path` must be a regular file: a FIFO or a device (`/dev/zero`) would be read
    forever. One line naming it otherwise."""
    import os
    import stat

    name = f"{flag} {path}".strip()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{name}: not found (expected {what})") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read {what} ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe, device or socket"
        raise InputError(f"{name}: is {kind}, not a regular file; expected {what}")

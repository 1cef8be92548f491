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

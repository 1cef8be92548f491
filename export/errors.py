"""The one exception type for bad user input. The CLI prints it as a single line and exits 2."""


class InputError(ValueError):
    """Input that the product cannot use: a missing file, a wrong shape, a bad field.

    The message names the file, row or field and what was expected.
    """

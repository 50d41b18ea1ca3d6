"""User-facing error type: anything a user can cause raises UserError, which the CLI prints as one line."""


class UserError(Exception):
    """An error the user can fix (bad path, bad option, bad file). The CLI prints it and exits with code 2."""

"""Errors a user can cause, each carrying one line that names the problem and the fix."""


class ConfigError(Exception):
    """A bad option or an unusable input file; the message is shown to the user as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

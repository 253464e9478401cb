"""Errors a user can cause, each carrying one line that names the problem and the fix."""


class ConfigError(Exception):
    """A bad option or an unusable input file; the message is shown to the user as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_with(message: str) -> None:
    """Print one line for the user on the real stderr and exit with status 1 (no traceback)."""
    import sys

    stream = sys.__stderr__ or sys.stderr
    stream.write(f"trackingproxy: error: {message}\n")
    stream.flush()
    raise SystemExit(1)

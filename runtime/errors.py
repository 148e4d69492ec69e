"""The one exception type for user errors, shared by the runtime and the toolkit.

Anything a user can cause (a wrong path, an unsupported checkpoint, a prompt longer than the
cache, an artifact of another manifest version) raises `TiDARError` with a one-line message;
the CLI prints it and exits with status 1, without a traceback. Programming errors stay
ordinary exceptions. It lives here, not in tidar_export, so the runtime needs no torch.
"""


class TiDARError(Exception):
    """A user-facing error whose message is a single line."""


def first_line(e: BaseException) -> str:
    """The first line of a library's exception message (its type name when the message is empty),
    to quote inside a one-line TiDARError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

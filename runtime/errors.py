"""The one exception type for user errors, shared by the runtime and the toolkit.

Anything a user can cause (a wrong path, an unsupported checkpoint, a prompt longer than the
cache, an artifact of another manifest version) raises `TiDARError` with a one-line message;
the CLI prints it and exits with status 1, without a traceback. Programming errors stay
ordinary exceptions. It lives here, not in tidar_export, so the runtime needs no torch.
"""


class TiDARError(Exception):
    """A user-facing error whose message is a single line."""


class FieldError(TiDARError):
    """A bad value of one named request field. `field` is its canonical name (the OpenAI API's
    snake_case JSON name: prompt, max_tokens, temperature, stop, ...), `detail` the rest of the
    one-line message. A front end names the field its own way with `named` (the HTTP server: the
    JSON field; the Triton model: its input; the command line: its flag), never by parsing text."""

    def __init__(self, field: str, detail: str):
        self.field, self.detail = field, detail
        super().__init__(self.named(field))

    def named(self, name: str) -> str:
        return f"{name} {self.detail}"


def first_line(e: BaseException) -> str:
    """The first line of a library's exception message (its type name when the message is empty),
    to quote inside a one-line TiDARError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

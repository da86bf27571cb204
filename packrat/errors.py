"""The one exception tree of Packrat.

Every error a user can cause derives from PackratError; the CLI prints its message on one line
and exits non-zero, so messages say what was wrong and what to do about it.
"""


class PackratError(Exception):
    """Base of every error Packrat raises on purpose."""


class ProfileError(PackratError):
    """A profile file is missing, empty or holds invalid measurements."""


class PlanError(PackratError):
    """The optimizer was asked for something it cannot plan (bad N or B, unservable B)."""


class ArchiveError(PackratError):
    """A model archive is missing, corrupt, or cannot be built."""


class ProfilerError(PackratError):
    """Measuring a model failed."""


class RequestError(PackratError):
    """One inference request's body is unusable (bad JSON, missing input, wrong shape or dtype).

    The handler answers that request alone with HTTP 400 and this message; the rest of its
    batch is still served.
    """


class TorchServeError(PackratError):
    """TorchServe could not be started or stopped, or refused or failed a request.

    Messages about a request name the method, the URL, the HTTP status and TorchServe's own
    message, e.g. "POST http://127.0.0.1:8081/models?url=x -> 500: <message>".
    """

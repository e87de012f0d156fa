"""The project's user-facing error type."""


class PipelineError(Exception):
    """A problem the user can fix (bad input, bad config, unreachable cluster).

    The CLI prints its message on one line, without a traceback, and exits 2.
    Bugs raise anything else and keep their traceback.
    """

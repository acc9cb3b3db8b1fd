"""The base of every error a user can fix; the CLI prints these as one line, without a traceback."""


class LorakitError(Exception):
    """A problem with the user's input (config, data, model, adapter) or a run that cannot go on."""

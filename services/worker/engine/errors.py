"""The error a caller of the engine gets for a request it must not accept."""


class EngineInputError(ValueError):
    """A request the engine refuses: bad prompt, bad sampling params, duplicate id, too long.

    The message names the field and the limit, fit for a 400 response.
    """

"""Errors any layer may raise. A leaf module: it imports nothing from the package, so the config
loader, the model and the AF1 compatibility code can all raise the same error without depending on
each other."""


class ConfigError(ValueError):
    """A configuration problem; the message names the field and the file."""

"""API keys and scopes: keys are random tokens shown once; the keys file stores only their sha256, a name and scopes."""


class ApiKeyError(ValueError):
    """A key that cannot be created or revoked as asked (an unknown scope or name, a name already taken)."""

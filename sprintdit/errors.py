"""One exception type for mistakes a user can fix; the CLI prints it as a single line."""


class UserError(Exception):
    """Bad input (config, path, checkpoint, option): reported as `error: <message>`, exit code 2."""

"""Errors shared by every module; torch-free so the Snakefile can import it cheaply."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data): printed as one line, no traceback."""

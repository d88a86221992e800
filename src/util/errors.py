"""The one exception type users see.

Every failure caused by user input (a bad file, a bad option, a missing model) is raised as
LoralabError with a one-line message; the CLI prints it without a traceback and exits 2.
Anything else is a bug and keeps its traceback.
"""


class LoralabError(Exception):
    """A user-facing error: the message alone says what is wrong and where."""

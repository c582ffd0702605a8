"""The rig's sandbox error (its own module: sandbox.py and dockerimages.py both raise it)."""


class SandboxError(RuntimeError):
    """The sandbox could not do what was asked; the message says what and where to look."""

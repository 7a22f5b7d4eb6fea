"""How a fast path changes what a module does without touching its parameters: the module's class becomes a
subclass of its own class and the fast path's (made once per pair, then reused)."""

_MADE = {}


def swap_class(module, bases, name):
    """Make ``module`` an instance of ``type(name, bases, {})`` (one class per ``bases``); returns the module."""
    if bases not in _MADE:
        _MADE[bases] = type(name, bases, {})
    module.__class__ = _MADE[bases]
    return module

"""A configuration error the user can fix, reported as one line instead of a traceback from fairseq."""
import sys


class B2TConfigError(ValueError):
    pass


_previous_hook = None


def own_error(exc):
    """Our error, or the one a caller wrapped in its own (fairseq's trainer turns any failure to load weights
    into "please ensure that the architectures match")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, B2TConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type, exc, tb):
    own = own_error(exc)
    if own is not None:
        print(f"b2t_fairseq: error: {own}", file=sys.stderr)
        return
    _previous_hook(exc_type, exc, tb)


def install_excepthook():
    """Called when the plugin is imported (fairseq-train/generate --user-dir b2t_fairseq)."""
    global _previous_hook
    if _previous_hook is None:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook

"""A configuration error the user can fix, reported as one line instead of a traceback from fairseq."""
import sys


class B2TConfigError(ValueError):
    pass


_previous_hook = None


def _excepthook(exc_type, exc, tb):
    if issubclass(exc_type, B2TConfigError):
        print(f"b2t_fairseq: error: {exc}", file=sys.stderr)
        return
    _previous_hook(exc_type, exc, tb)


def install_excepthook():
    """Called when the plugin is imported (fairseq-train/generate --user-dir b2t_fairseq)."""
    global _previous_hook
    if _previous_hook is None:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook

"""The environment switches of the fast paths (``B2T_PACKED_LINEARS``, ``B2T_FAST_SEARCH``): 0/false/off/no (any
case, spaces around ignored) switch one off, 1/true/on/yes or unset keep it on; anything else is one clear error."""
import os

from b2t_fairseq.safety.errors import B2TConfigError

_VALUES = {**dict.fromkeys(("0", "false", "off", "no"), False), **dict.fromkeys(("1", "true", "on", "yes"), True)}


def switched_on(name: str, what: str) -> bool:
    """What the environment variable ``name`` says (on when unset); ``what`` names what it switches, for the error."""
    raw = os.environ.get(name)
    if raw is None:
        return True
    try:
        return _VALUES[raw.strip().lower()]
    except KeyError:
        raise B2TConfigError(
            f"{name}={raw!r}: use 0, false, off or no to switch {what} off, 1, true, on or yes (the default) to keep "
            f"{'them' if what.endswith('s') else 'it'}"
        ) from None

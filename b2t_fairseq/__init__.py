"""b2t_fairseq: the B2T connection (Takase et al., Findings of ACL 2023) for stock fairseq.

Importing this package (``--user-dir b2t_fairseq``) registers the models and architectures.
"""
import os

from b2t_fairseq import options
from b2t_fairseq.compat import background_threads, checkpoints, distributed, numpy2
from b2t_fairseq.fast_paths import search
from b2t_fairseq.safety import errors, preemption, runs


def _answer_to_fairseqs_spellings():
    """fairseq's ``--user-dir b2t_fairseq`` (and hub ``from_pretrained(..., user_dir=...)``) looks for the
    directory beside its own package and compares the unnormalised path (``.../fairseq/../b2t_fairseq``) with
    the imported package's ``__path__``: once this package is imported, the same directory spelled that way was
    "not globally unique". List those spellings of this very directory in ``__path__``."""
    import fairseq

    here = os.path.realpath(os.path.dirname(__file__))
    base = os.path.dirname(fairseq.__file__)
    for spelling in (os.path.join(base, "b2t_fairseq"), os.path.join(base, "..", "b2t_fairseq")):
        if os.path.realpath(spelling) == here and spelling not in __path__:
            __path__.append(spelling)


_answer_to_fairseqs_spellings()

checkpoints.allow_fairseq_checkpoints()
numpy2.install()
distributed.install()
background_threads.install()
errors.install_excepthook()
runs.install()
preemption.install()
options.install_shared_name_handling()
search.install()

# registers the models
from b2t_fairseq.models import s2t_transformer_b2t, transformer_b2t, transformer_lm_b2t  # noqa: E402,F401

__version__ = "0.1.0"

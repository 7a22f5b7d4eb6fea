"""fairseq 0.12 under numpy 2: two of its datasets name ``np.compat.long`` (TokenBlockDataset, which language
modelling with ``--sample-break-mode eos`` uses, and LanguagePairDataset's token counts), a module numpy 2 removed.
In numpy 1 that name was Python's ``int``. The plugin restores exactly that one name, and only where it is
missing, instead of pinning numpy < 2 for everyone who installs it (the rest of fairseq 0.12's text code runs on
numpy 2, and torch, matplotlib and scikit-learn are built for it).
"""
import types

import numpy as np


def install():
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=int)

"""b2t_fairseq: the B2T connection (Takase et al., Findings of ACL 2023) for stock fairseq.

Importing this package (``--user-dir b2t_fairseq``) registers the models and architectures.
"""
from b2t_fairseq import checkpoint_compat, errors, options, run_safety

checkpoint_compat.allow_fairseq_checkpoints()
errors.install_excepthook()
run_safety.install()
options.install_shared_name_handling()

from b2t_fairseq.models import transformer_b2t, transformer_lm_b2t  # noqa: E402,F401  (registers models)

__version__ = "0.1.0"

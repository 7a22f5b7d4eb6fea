"""``--init-scaling``: a method's own initialisation, applied once after fairseq's.

The rules live with their methods in :mod:`connections` (``depth`` is B2T's N^-1/2 on every non-LN weight
matrix of each layer, the authors' current code; ``deepnorm`` and ``tfixup`` are DeepNet's and T-Fixup's).
Any rule can be combined with any method; the model logs when it is not the method's own.
"""
import logging

import torch

from b2t_fairseq.modules.connections import INIT_RULES

logger = logging.getLogger(__name__)


@torch.no_grad()
def apply_init_scaling(stack, rule):
    """Apply init rule ``rule`` (a key of INIT_RULES, or "none") to one built stack. Returns its factor."""
    if rule == "none":
        return None
    connection = stack.connection
    if connection.default_init_scaling != rule:
        logger.info(
            f"--init-scaling {rule} on --connection {connection.name}: not the method's own initialisation "
            f"({connection.default_init_scaling})"
        )
    return INIT_RULES[rule].scale_init(stack, connection.shape)

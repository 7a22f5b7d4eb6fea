"""The method itself: the residual connections (one class each), the layers and init rules using them, word dropout."""
from b2t_fairseq.modules.connections import CONNECTIONS, INIT_RULES, get_connection, stack_shape  # noqa: F401
from b2t_fairseq.modules.init_scaling import apply_init_scaling  # noqa: F401
from b2t_fairseq.modules.layers import ConnectedDecoderLayer, ConnectedEncoderLayer  # noqa: F401
from b2t_fairseq.modules.word_dropout import dropping_words, word_dropout  # noqa: F401

from b2t_fairseq.modules.connections import CONNECTIONS, get_connection  # noqa: F401
from b2t_fairseq.modules.init_scaling import rescale_stack  # noqa: F401
from b2t_fairseq.modules.layers import ConnectedDecoderLayer, ConnectedEncoderLayer  # noqa: F401
from b2t_fairseq.modules.word_dropout import dropping_words, word_dropout  # noqa: F401

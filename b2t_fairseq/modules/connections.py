"""How a Transformer layer wires its sub-layers to the residual stream.

Each class below is one line of PAPER.md. ``f`` is a sub-layer (attention or FFN, dropout included),
``norm`` is the layer norm that belongs to that sub-layer, ``bottom`` is the raw input of the whole layer.
A layer calls ``sublayer`` for every sub-layer but the last, and ``last_sublayer`` for the FFN.

Adding a method (DeepNorm's ``norm(alpha * x + f(x))``, say) means adding one small class here.
"""


class Connection:
    name = None
    # Pre-LN stacks end with one extra layer norm; fairseq keys that off ``normalize_before``.
    normalize_before = False
    # What ``--init-scaling auto`` means for this connection.
    default_init_scaling = "none"

    def sublayer(self, x, f, norm):
        raise NotImplementedError

    def last_sublayer(self, x, f, norm, bottom):
        return self.sublayer(x, f, norm)

    def __repr__(self):
        return f"{type(self).__name__}()"


class PostLN(Connection):
    """h = LN(x + F(x)) — Vaswani et al.; fairseq's default."""

    name = "post-ln"

    def sublayer(self, x, f, norm):
        return norm(x + f(x))


class PreLN(Connection):
    """h = x + F(LN(x)) — fairseq's ``--*-normalize-before``."""

    name = "pre-ln"
    normalize_before = True

    def sublayer(self, x, f, norm):
        return x + f(norm(x))


class B2T(PostLN):
    """Post-LN, plus the layer input ``bottom`` added before the layer's last norm:
    y = LN(x_bottom + h + FFN(h)). The bottom term gets no dropout."""

    name = "b2t"
    default_init_scaling = "depth"

    def last_sublayer(self, x, f, norm, bottom):
        return norm(bottom + x + f(x))


CONNECTIONS = {c.name: c for c in (B2T(), PostLN(), PreLN())}


def get_connection(name):
    try:
        return CONNECTIONS[name]
    except KeyError:
        raise ValueError(f"unknown connection {name!r}; choose one of {', '.join(CONNECTIONS)}") from None

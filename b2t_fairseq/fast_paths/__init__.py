"""Faster decoding and training on the same weights: packed/int8 Linear, key/value buffers, our beam search."""

"""Faster decoding and training without other weights: packed and int8 Linear layers on the CPU, the decoder's
key/value buffers, a beam search of our own behind fairseq's SequenceGenerator, compiled layers."""

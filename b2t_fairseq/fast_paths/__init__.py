"""Faster decoding and training without other weights: packed and int8 Linear layers on the CPU, compiled layers."""

"""Fixes for the fairseq 0.12 / numpy 2 / torch >= 2.6 we run on, installed when the plugin is imported."""

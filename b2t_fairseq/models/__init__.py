"""The fairseq models of the plugin (translation, language model, speech to text), registered on import."""

"""Console tools of b2t_fairseq: checkpoint averaging, scoring, the end-to-end pipeline."""

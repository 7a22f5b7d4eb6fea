"""Analysis tools: per-layer gradient norms (``b2t-grad-norms``) and training-loss curves (``b2t-loss-curves``)."""

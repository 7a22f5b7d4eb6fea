"""End-to-end recipes for the paper's tables; each reads its hyperparameters from configs/<recipe>/."""

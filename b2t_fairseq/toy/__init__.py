"""Generated corpora for the demo and the tests: a toy translation grammar, spoken digits."""

"""What keeps a run from being lost or mixed with another, and bad input from being more than one clear line."""

"""Run state: the run's layout and its files, the embedding store."""

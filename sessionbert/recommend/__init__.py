"""New-service recommendation: the paper's recommender, baselines and ranking metrics."""

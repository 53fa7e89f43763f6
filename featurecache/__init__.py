"""featurecache: compute a frozen teacher's features once, train against them forever."""

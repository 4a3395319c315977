"""Learning: networks' training data, pairs, training, evaluation, stepwise transfer. Needs torch."""

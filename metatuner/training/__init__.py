"""Training: the MetaTuner loop, rollouts and checkpoints."""

"""Distillation: the weighted loss (Eq. 15), stage-wise examples, and (next) the training loop."""

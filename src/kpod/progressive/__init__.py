"""In-rationale progressive distillation: step difficulty, pacing, value function, schedule."""

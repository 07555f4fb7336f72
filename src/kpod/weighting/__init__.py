"""Token weighting by mask learning (paper section 3.3): which rationale tokens are keypoints."""

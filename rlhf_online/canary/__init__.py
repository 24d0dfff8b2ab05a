"""Live canary trials: the sequential test on users' thumbs (stats), the trial's decision (decision), and
simulated trials for error rates (simulate)."""

"""The gradient-fidelity probe (``ctpo probe``): how far each ratio design's gradient is from the true
on-policy gradient, and how noisy it is, on the tiny language-model policy as staleness grows.

- `settings` — `ProbeSettings` (the config's ``probe:`` section), torch-free.
- `stats` — two-sample bias / cosine / variance / MSE with bootstrap intervals (the lab's statistic with a
  noisy target).
- `core` — the measurement against a small `Policy` interface (sample episodes; log-probs and per-episode
  gradients for given coefficient tables).
- `llm` — the tiny LLM with the study's sampler, sandbox, grader and update; `mdp` — the lab's enumerable
  MDP behind the same interface, where the truth is exact.
- `run`, `report` — the command end to end and its files.

docs/probe.md says what it found.
"""

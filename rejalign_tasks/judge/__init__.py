"""Second-stage model judges over lm-eval sample logs (`rejalign-judge`).

``judges`` names the six published judges with their exact upstream prompts and output parsers
(``prompts``, ``parsers``); ``tiny`` builds tiny random judge checkpoints for tests and
benchmarks. The engines, the runner and the command line live beside them.
"""

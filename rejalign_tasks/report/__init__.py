"""``rejalign-report``: paper-style tables, figures and paired tests from lm-eval output folders.

Modules: :mod:`.cli` (the command line), :mod:`.report` (the report folder, :func:`make_report`),
:mod:`.tables` (filling the spec's tables, Markdown and CSV), :mod:`.compare` (paired
comparisons), :mod:`.spec` (which columns the tables show), :mod:`.logs` (lm-eval results files
grouped by model), :mod:`.samples` (per-sample logs and pairing them), :mod:`.manifests`
(adapter manifests, refusal fractions), :mod:`.stats`, :mod:`.plots` and :mod:`.errors`.
Nothing is imported here, so ``--help`` stays quick.
"""

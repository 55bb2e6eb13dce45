"""``rejalign-sweep``: the paper's central figure in one command.

For each refusal fraction the sweep mixes the training data (``rejalign-train mix``), fine-tunes
the model on it (``rejalign-train fit``) and evaluates the adapter (``rejalign-eval``); the base
model is evaluated once as the reference; then ``rejalign-report`` draws the table and the
figures over all of them. Named arms (``arms:`` in the YAML: other sources, sizes and mix
options, e.g. VLGuard against LLaVA-Med) are rows too, run the same way in ``OUT/NAME/``;
``--recipe paper_comparison`` is the paper's comparison shipped as such a file. Every step has
its own folder::

    OUT/sweep.json                     the configuration of the latest run
    OUT/frac-0.10/mix/                 mixed.jsonl + mixed.manifest.json
    OUT/frac-0.10/fit/adapter/         the LoRA adapter and its rejalign_manifest.json
    OUT/frac-0.10/eval/results/        lm-eval's results_*.json and samples_*.jsonl
    OUT/base/eval/results/             the base model, evaluated on the same tasks
    OUT/report/                        report.md, table_*.csv, cells.csv, figures

Why steps and markers: a sweep takes hours to days, and it gets interrupted. A step is finished
only when its folder holds ``rejalign_step.json``, written atomically as the step's last act; the
marker records the step's inputs (options, source-file and upstream-output digests) and the
digests of what it wrote. A rerun skips a step whose marker matches the inputs it would run with
and whose outputs are still the ones recorded, and redoes any other step from an empty folder.
Downstream inputs include the upstream outputs' digest, so a changed option redoes exactly the
steps it affects (a new fit option: every fit, eval and the report; a new ``--limit``: the evals
and the report) and never reuses stale results.

Each fit and eval runs as a subprocess (the model is loaded in a fresh process, ``--fit-launcher``
can be ``accelerate launch`` or ``torchrun``), with its output in the step's log file. A child
process is terminated when the sweep dies, even by SIGKILL, so a killed sweep leaves no orphan
training behind.

The modules, each importable on its own (nothing is re-exported here, so ``--help`` stays fast):

* ``options``   -- ``SweepArguments``, parsing, the ``--mix.X/--fit.X/--eval.X`` pass-through,
  the checks run before the first step;
* ``arms``      -- ``Row``: a fraction or a named arm, and the arms' checks;
* ``recipes``   -- the configurations shipped in ``rejalign_train/recipes`` and ``--set``;
* ``cache``     -- ``StepCache``: the step markers and the digests they hold;
* ``supervise`` -- subprocesses with log files that die with the sweep; one sweep per folder;
* ``pipeline``  -- ``Sweep``: the steps in order;
* ``cli``       -- ``main``, the ``rejalign-sweep`` console script.
"""


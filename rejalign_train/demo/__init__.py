"""``rejalign-demo``: the paper's whole loop in minutes on a CPU, as a SYNTHETIC DEMONSTRATION.

No real model or instruction data can be downloaded for a laptop demo, so the demo builds them:

* ``model``  -- the small "instruction-tuned" VLM (a tiny random LLaVA from ``tiny.py``, fully
  finetuned on synthetic visual instructions plus text-only refusals). The e2e tests use the same
  builder. Like the MLLMs of the paper it refuses harmful text and complies with the same request
  as a typographic image (FigStep ASR near 1).
* ``sources`` -- the sweep's benign training sources (typographic lists whose replies become
  refusals, and ordinary visual instructions), the report spec and the output folder's notice;
* ``cli``    -- ``main``, the console script: build, then drive the real ``rejalign-sweep``
  (``rejalign-train mix``/``fit``, ``rejalign-eval`` through lm-eval, ``rejalign-report``).

Nothing is re-exported here, so ``rejalign-demo --help`` stays fast.
"""

"""``python -m fastcert.certify checkpoint=PATH [eps=[0.05,0.1]] [complete.engine=neuralsat] ...``

Re-evaluates a trained checkpoint on the test split at one or more radii ε (pixel units; by default
the run's test radius ``eval.eps``, else its training ``eps``):

* clean accuracy;
* attacked accuracy ("pgd") under certify's strong default attack
  (:class:`fastcert.attacks.StrongAttack`; ``attack=pgd`` selects plain PGD), inside the same
  clipped box the verifiers bound: an upper bound of the robust accuracy;
* verified accuracy by a cascade IBP (Gowal et al. 2018) → CROWN-IBP (Zhang et al. 2020) →
  CROWN (Zhang et al. 2018) → α-CROWN (Xu et al. 2021, auto_LiRPA's ``CROWN-Optimized``) →
  optionally a complete verifier (:mod:`fastcert.certify.complete_stage`,
  :mod:`fastcert.complete`): each stage only on the examples still undecided. An example is
  verified when every margin lower bound m̲_j = lower bound of [f(x')]_y - [f(x')]_j over the
  box is > 0 (Eq. 2 of Shi et al. 2021), or when the complete engine proves the VNN-LIB
  property UNSAT. With ``cascade=false`` every verifier runs on every example instead.

Soundness: :func:`fastcert.evaluate.evaluate` checks per example verified ⇒ attack-robust ⇒
clean-correct; the complete stage replays every counterexample and checks its verdicts against
the attack and the bounds. A violation is recorded in certify.json and certify.csv, which are
written first, and then raised as ``SoundnessError`` (exit 3).

Scale and resume (:mod:`fastcert.certify.journal`): every test batch and every complete-stage
verdict is appended to ``<out dir>/journal/`` when decided; a killed certify resumes from it and
ends with the same outputs (up to :data:`fastcert.certify.outputs.TIMING_FIELDS`);
``workers=N`` certifies test batches b ≡ i (mod N) in N processes, ``shard=i/n`` is one such
process (e.g. one job of a Hydra multirun), and the outputs are assembled from the shared
journal. A certify at new radii into the same dir adds them to the earlier ones.

Outputs, in the output dir (default ``<checkpoint dir>/certify/``): ``certify.json``,
``certify.csv`` (columns: :func:`fastcert.certify.outputs.csv_columns`), ``journal/``,
``complete/`` (the ONNX model, properties and engine logs), ``.hydra/``. See docs/certify.md.
"""
from fastcert.certify.command import certify, cli, main
from fastcert.certify.outputs import SUMMARY_KEYS, TIMING_FIELDS, csv_columns, format_table

__all__ = ["SUMMARY_KEYS", "TIMING_FIELDS", "certify", "cli", "csv_columns", "format_table",
           "main"]

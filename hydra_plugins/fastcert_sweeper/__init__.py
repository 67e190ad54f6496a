"""fastcert's Hydra sweeper: an Optuna study driven through ask/tell (``hydra/sweeper=fastcert``;
docs/search.md). Hydra finds sweepers only in the ``hydra_plugins`` namespace package and
imports every module here at start-up, so the plugin imports Optuna and fastcert's training
code lazily; its space and bookkeeping live in :mod:`fastcert.sweep`."""

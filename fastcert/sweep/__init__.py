"""The parts of fastcert's Hydra sweeper (``hydra_plugins.fastcert_sweeper``) that are not the
plugin class: the search space (:mod:`.space`) and the study's bookkeeping (:mod:`.trials`).
They import Optuna lazily: Hydra imports the plugin, hence these, at every start-up."""

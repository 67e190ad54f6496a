"""Complete verification of the examples the incomplete cascade leaves undecided.

An engine (:class:`fastcert.complete.engine.Engine`) decides one VNN-LIB property of
``fastcert.export``'s format (UNSAT iff the example is robust) on fastcert's own ONNX model and
returns a :class:`fastcert.complete.engine.Verdict`: verified / falsified / timeout / error, its
time, the counterexample if any. Modules:

* :mod:`~fastcert.complete.engine` — the interface, the verdicts, the engine registry;
* :mod:`~fastcert.complete.limits` — a subprocess under a wall-time and a memory limit;
* :mod:`~fastcert.complete.vnncomp` — VNN-COMP result files (``sat`` + assignment / ``unsat`` /
  ``timeout`` / ``unknown``);
* :mod:`~fastcert.complete.neuralsat` — NeuralSAT (Duong et al.; PyPI ``neuralsat``);
* :mod:`~fastcert.complete.abcrown` — α,β-CROWN (Wang et al. 2021), installed from source;
* :mod:`~fastcert.complete.replay` — a counterexample replayed through the PyTorch model.
"""

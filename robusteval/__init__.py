"""robusteval — adversarial-robustness evaluation for PyTorch image classifiers.

The application layer over the attack library :mod:`attacks`: datasets and checkpoints
(:mod:`robusteval.data`, :mod:`robusteval.models`), the evaluation runner and its per-example
records (:mod:`robusteval.runner`, :mod:`robusteval.records`), local linearity γ(ε, x)
(:mod:`robusteval.linearity`), the reference trainer (:mod:`robusteval.training`), reports and
figures (:mod:`robusteval.reports`) and the ``robusteval`` command line (:mod:`robusteval.cli`).

Method: C. Qin et al., "Adversarial Robustness through Local Linearization", NeurIPS 2019.
"""

__version__ = "0.1.0"

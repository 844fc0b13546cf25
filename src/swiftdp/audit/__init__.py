"""Empirical privacy auditing of the real training pipeline.

* :func:`one_run` — one training run with gradient canaries, a lower bound on
  ε at a chosen confidence (Steinke et al. 2023; the f-DP refinement of
  Mahloujifar et al. 2025), beside the accountant's ε (:mod:`.one_run`,
  :mod:`.bounds`).
* :class:`InputCanaries` — crafted training examples scored on the model you
  trained in your own loop: a black-box one-run bound (:mod:`.inputs`).
* :func:`many_runs` — independent runs with one canary each, for leaks of a
  count that one run cannot attribute to a canary (:mod:`.many_runs`).
* :mod:`.faults` — test-only injections of known privacy bugs, to check an
  audit's power on a configuration.
* :func:`audit_gaussian_step` — the older many-run audit of one step.
"""

from swiftdp.audit import faults
from swiftdp.audit.bounds import epsilon_lower_bound as one_run_lower_bound
from swiftdp.audit.bounds import epsilon_lower_bound_fdp
from swiftdp.audit.canary import AuditResult, audit_gaussian_step, epsilon_lower_bound
from swiftdp.audit.inputs import InputCanaries
from swiftdp.audit.many_runs import many_runs
from swiftdp.audit.one_run import OneRunAudit, one_run

__all__ = ["AuditResult", "InputCanaries", "OneRunAudit", "audit_gaussian_step", "epsilon_lower_bound",
           "epsilon_lower_bound_fdp", "faults", "many_runs", "one_run", "one_run_lower_bound"]

"""Empirical privacy auditing of the real training pipeline."""

from swiftdp.audit.canary import AuditResult, audit_gaussian_step, epsilon_lower_bound

__all__ = ["AuditResult", "audit_gaussian_step", "epsilon_lower_bound"]

"""The privacy report of a ``swiftdp train`` run: ``privacy.json`` and ``privacy.md``.

Written into the run folder when a run finishes, and rewritten when a resumed
run finishes, it says what the run's (ε, δ) covers and what it rests on: the
mechanism (DP-SGD: Poisson-subsampled Gaussian, add/remove-one neighbours,
one training example as the unit), σ and C with their schedules, q, the
steps, δ, and ε from the run's accountant and recomputed from the same
history by every other accountant (PLD, RDP and PRV are upper bounds; GDP is
an approximation). ``privacy.json`` is for programs (numbers as numbers,
``null`` where a value does not apply, never ``Infinity``); ``privacy.md``
says the same to a person. A ``--non-private`` run's report says that no
guarantee holds.

The report reads what the accountant recorded: writing it costs no privacy.
It never records the seed (``config.yaml`` does): a seed regenerates the noise.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import replace
from typing import Any

from swiftdp import __version__
from swiftdp.accounting import MECHANISMS, AccountingSegment, PrivacyAccountant
from swiftdp.cli import rundir
from swiftdp.cli.privacy import total_clip
from swiftdp.cli.train import Trainer

FORMAT = "swiftdp-privacy-report/1"
README_SECTION = 'README.md, "Privacy guarantees and their assumptions"'

SECONDS_PER_SEGMENT = {"pld": 0.5, "rdp": 0.1, "prv": 1.0, "gdp": 0.0}
"""Rough cost of recomputing ε per (σ, q) segment of the history (2-core CPU)."""

RECOMPUTE_BUDGET_S = 30.0
"""Another accountant whose estimated cost is above this is not run (the report says so)."""

_INDEPENDENCE = ("the model is run again with examples 0 and B−1 replaced, on the first "
                 "batch of each input shape; no other example's output nor any buffer may "
                 "change, and the gradient of one example's outputs must not reach another "
                 "example's (float) inputs. It cannot see mixing that shows only for other "
                 "data or examples.")
_LOSS = ("at the 1st, 2nd, 4th, ... step of each output signature the loss is traced "
         "from the outputs and refused if it couples examples or does not match its "
         "reduction. It reads values, not provenance.")
_PASSED = "nothing refused (a refusal stops the run)"


def epsilon_by_accountant(history: tuple[AccountingSegment, ...], delta: float, own: str,
                          own_epsilon: float) -> dict[str, dict[str, Any]]:
    """ε of ``history`` at ``delta`` by each accountant, the run's own (``own``) as reported.

    An accountant whose estimated cost exceeds :data:`RECOMPUTE_BUDGET_S`
    (a long history of changing σ) is not run, and one that fails does not
    stop the report: its entry has ``epsilon: None`` and a ``note`` saying why.

    Returns:
        ``{name: {"epsilon", "upper_bound", "note"}}`` for each of
        :data:`~swiftdp.accounting.MECHANISMS`; ``upper_bound`` is False for
        ``"gdp"`` (a central-limit approximation that can under-state ε).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in MECHANISMS:
        entry: dict[str, Any] = {"epsilon": None, "upper_bound": name != "gdp", "note": None}
        cost = SECONDS_PER_SEGMENT.get(name, 1.0) * len(history)
        if name == own:
            entry.update(epsilon=own_epsilon, note="the run's accountant")
        elif cost > RECOMPUTE_BUDGET_S:
            entry["note"] = (f"not computed: {len(history)} segments of different σ or q would "
                             f"take about {cost:.0f} s")
        else:
            try:
                entry["epsilon"] = _recompute(name, history, delta)
            except Exception as e:  # the finished run keeps its report whatever fails here
                entry["note"] = f"failed: {type(e).__name__}: {e}"
        if name == "gdp" and entry["epsilon"] is not None:
            entry["note"] = "approximation, not an upper bound (central limit theorem)"
        out[name] = entry
    return out


def _recompute(name: str, history: tuple[AccountingSegment, ...], delta: float) -> float:
    absl = logging.getLogger("absl")  # RDP logs the orders it leaves out (harmless: ε only grows)
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GDP warns that it is no bound: the report says so
            accountant = PrivacyAccountant(name)
            for s in history:
                accountant.step(s.noise_multiplier, s.sample_rate, s.steps)
            return accountant.epsilon(delta)
    finally:
        absl.setLevel(level)


def privacy_report(trainer: Trainer) -> dict[str, Any]:
    """The content of ``privacy.json`` for a finished (or resumed and finished) run."""
    cfg, prep = trainer.cfg, trainer.prep
    text = prep.data.task == "language-modelling"
    unit = (f"one example (one block of {cfg.seq_len} bytes of the text file)" if text
            else "one example (one image)")
    common: dict[str, Any] = {
        "format": FORMAT, "swiftdp_version": __version__, "dataset": cfg.dataset,
        "model": cfg.model, "dataset_size": len(prep.train), "steps": trainer.steps,
        "epochs": trainer.epoch, "processes": cfg.nproc, "audit": None}
    if trainer.dp is None:
        return {**common, "private": False, "epsilon": None, "epsilon_infinite": True,
                "delta": None,
                "guarantee": "none: --non-private trains without clipping or noise (ε = ∞); "
                             "the model may reveal any training example."}
    dp, priv = trainer.dp, trainer.dp.privacy
    history = dp.accountant.history
    epsilon = trainer.epsilon()
    first_sigma, last_sigma = trainer.sigmas() or (priv.noise_multiplier,) * 2
    first_c, last_c = trainer.clip_norms() or (total_clip(priv.max_grad_norm),) * 2
    initial = dp.optimizer.initial_max_grad_norm
    groups = None
    if isinstance(initial, tuple):
        now = dict(priv.max_grad_norm) if isinstance(priv.max_grad_norm, tuple) else {}
        groups = [{"group": k, "first": c,
                   "after_last_step": now.get(k) if priv.adaptive is not None else c}
                  for k, c in initial]
    adaptive = None
    if priv.adaptive is not None:
        def own(s: float) -> float:
            return replace(priv, noise_multiplier=s).gradient_noise_multiplier()
        adaptive = {"spec": cfg.adaptive_clipping, "target_quantile": priv.adaptive.target_quantile,
                    "learning_rate": priv.adaptive.learning_rate,
                    "count_noise": priv.adaptive.count_noise,
                    "first_gradient_noise_multiplier": own(first_sigma),
                    "last_gradient_noise_multiplier": own(last_sigma)}
    seeded = ("secure (--secure): noise and sampling from the OS's cryptographically secure "
              "generator, the noise a float64 sum of Gaussians per coordinate; checkpoint.pt "
              "holds no generator state and a resume draws fresh entropy" if cfg.secure
              else "seeded by --seed, which config.yaml records: it regenerates the noise and the "
              "sampling, and checkpoint.pt holds the generators' states; keep both files as "
              "secret as the training data" if cfg.seed is not None
              else "seeded from OS entropy (no --seed, not secure mode): checkpoint.pt holds "
                   "the generators' states; keep it as secret as the training data")
    return {
        **common, "private": True, "epsilon": epsilon, "epsilon_infinite": math.isinf(epsilon),
        "delta": priv.delta, "accountant": priv.accountant, "target_epsilon": cfg.epsilon,
        "epsilon_by_accountant": epsilon_by_accountant(history, priv.delta, priv.accountant,
                                                       epsilon),
        "mechanism": {"algorithm": "DP-SGD", "noise": "gaussian", "sampling": "poisson",
                      "neighbours": "add/remove one example", "privacy_unit": unit,
                      "augmult": cfg.augmult, "augment": cfg.augment,
                      "views_clipped_together": cfg.augmult > 1},
        "noise": {"first_noise_multiplier": first_sigma, "last_noise_multiplier": last_sigma,
                  "noise_schedule": cfg.noise_schedule,
                  "calibrated": cfg.noise_multiplier is None},
        "clipping": {"style": priv.clipping, "first_max_grad_norm": first_c,
                     "last_max_grad_norm": last_c, "clip_schedule": cfg.clip_schedule,
                     "per_layer": cfg.clip_per_layer,
                     "num_groups": None if groups is None else len(groups), "groups": groups,
                     "adaptive": adaptive},
        "sampling": {"sample_rate": priv.sample_rate,
                     "expected_batch_size": priv.expected_batch_size,
                     "poisson": priv.poisson_sampling},
        "history": [{"noise_multiplier": s.noise_multiplier, "sample_rate": s.sample_rate,
                     "steps": s.steps} for s in history],
        "assumptions": {
            "sampling": "each step takes every example independently with probability q "
                        "(the library's Poisson loader draws it)",
            "adjacency": "add/remove one example; the sensitivity of a step's clipped sum is C",
            "privacy_unit": unit + (f"; its {cfg.augmult} augmented views are clipped together, "
                                    "to C" if cfg.augmult > 1 else ""),
            # make_run_private leaves check_independence at its default, on.
            "independence_check": {"enabled": True, "outcome": _PASSED, "what": _INDEPENDENCE},
            "loss_check": {"enabled": dp.clipper.check_loss,
                           "outcome": _PASSED if dp.clipper.check_loss else None, "what": _LOSS},
            "not_covered": "the training loss and accuracy in metrics.json",
            "see": README_SECTION},
        "noise_generator": {"seeded": cfg.seed is not None and not cfg.secure, "secure": cfg.secure,
                            "checkpoint_holds_generator_state": not cfg.secure,
                            "consequence": seeded + "."},
    }


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def _sigma_text(r: dict[str, Any]) -> str:
    noise, clip = r["noise"], r["clipping"]
    first, last = noise["first_noise_multiplier"], noise["last_noise_multiplier"]
    text = f"{first:.4f}"
    if noise["noise_schedule"] is not None:
        text = f"{first:.4f} first, {last:.4f} last (`--noise-schedule {noise['noise_schedule']}`)"
    text += f" (calibrated to ε = {r['target_epsilon']:g})" if noise["calibrated"] else ""
    a = clip["adaptive"]
    if a is not None:
        text += (f"; the gradient's own σ_g {a['first_gradient_noise_multiplier']:.4f} first, "
                 f"{a['last_gradient_noise_multiplier']:.4f} last; count noise "
                 f"{a['count_noise']:.4g}")
    return text


def _clip_text(c: dict[str, Any]) -> str:
    text = f"{c['first_max_grad_norm']:.4g} ({c['style']}"
    if c["first_max_grad_norm"] != c["last_max_grad_norm"]:
        text = f"{c['first_max_grad_norm']:.4g} first, {c['last_max_grad_norm']:.4g} last ({c['style']}"
    if c["groups"] is not None:
        ks = sorted({round(g["first"], 6) for g in c["groups"]})
        text += f"; `--clip-per-layer`: {c['num_groups']} groups, C_k = {', '.join(map(_g, ks))}"
    if c["clip_schedule"] is not None:
        text += f"; `--clip-schedule {c['clip_schedule']}`"
    if c["adaptive"] is not None:
        text += f"; `--adaptive-clipping {c['adaptive']['spec']}`"
    return text + ")"


def markdown(r: dict[str, Any]) -> str:
    """``privacy.md``: the report :func:`privacy_report` as a short table and notes."""
    rows = [("dataset, model", f"{r['dataset']}, {r['model']}")]
    if not r["private"]:
        rows += [("guarantee", "**none** (ε = ∞)"),
                 ("steps", f"{_steps(r)} on {r['dataset_size']} examples"),
                 ("processes", str(r["processes"]))]
        head = ["# Privacy report: no privacy guarantee", "",
                "No privacy guarantee holds (ε = ∞): this run used `--non-private`, which "
                "trains without clipping or noise; the model may reveal any training example."]
        return "\n".join([*head, "", *_table(rows), "", _audit_line(r),
                          _inputs_line(r), ""])
    m, s, eps = r["mechanism"], r["sampling"], r["epsilon_by_accountant"]
    rows += [("mechanism", "DP-SGD: Gaussian noise on the sum of clipped per-example "
                           "gradients, Poisson subsampling"),
             ("neighbours", m["neighbours"]), ("privacy unit", r["assumptions"]["privacy_unit"])]
    for name, e in eps.items():
        value = "not computed" if e["epsilon"] is None else f"{e['epsilon']:.4f}"
        kind = "upper bound" if e["upper_bound"] else "approximation, not an upper bound"
        note = f"; {e['note']}" if e["note"] and e["upper_bound"] else ""
        rows.append((f"ε ({name.upper()})", f"{'**' + value + '**' if name == r['accountant'] else value} "
                                          f"({kind}{note})"))
    rows += [("δ", f"{r['delta']:g}"), ("σ", _sigma_text(r)), ("C", _clip_text(r["clipping"])),
             ("q", f"{s['sample_rate']:.4g} (expected batch {s['expected_batch_size']:g} of "
                   f"{r['dataset_size']} examples)"),
             ("steps", _steps(r)),
             ("processes", str(r["processes"])),
             ("noise", r["noise_generator"]["consequence"])]
    a = r["assumptions"]
    notes = [f"- Sampling: {a['sampling']}.", f"- Adjacency: {a['adjacency']}.",
             _check_note("Independence check", a["independence_check"]),
             _check_note("Loss check", a["loss_check"]),
             f"- Not covered: {a['not_covered']}.", f"- Details: {a['see']}."]
    head = [f"# Privacy report: ({r['epsilon']:.4g}, {r['delta']:g})-DP", "",
            f"ε by the run's {r['accountant'].upper()} accountant, for {m['privacy_unit']} of "
            f"the {r['dataset_size']} training examples."]
    return "\n".join([*head, "", *_table(rows), "", _audit_line(r), _inputs_line(r), "",
                      "## Assumptions", "",
                      *notes, ""])


def _steps(r: dict[str, Any]) -> str:
    return f"{r['steps']} ({r['epochs']} epoch{'' if r['epochs'] == 1 else 's'})"


def _check_note(name: str, check: dict[str, Any]) -> str:
    if not check["enabled"]:
        return f"- {name}: off."
    return f"- {name}: on, {check['outcome']}. It checks: {check['what']}"


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v.replace('|', '/')} |" for k, v in rows)]


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no ``Infinity``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def audit_of(trainer: Trainer) -> dict[str, Any]:
    """``--audit``: the run's mechanism audited in one run with gradient canaries (``audit.png``).

    The real pipeline (``make_private``: Poisson sampling at the run's q, the
    engine in the run's mode, the noise at its σ, the division by q·N) for as
    many steps as the run took, on a linear model with 1,000 gradient
    canaries and fillers in as many slots as the run's dataset has
    (:func:`swiftdp.audit.one_run`).
    """
    from swiftdp.audit.one_run import one_run
    from swiftdp.cli.audit import write

    dp = trainer.dp
    assert dp is not None
    priv = dp.privacy
    canaries = 1000
    result = one_run(canaries=canaries, fillers=max(0, len(trainer.prep.train) - canaries),
                     steps=max(1, trainer.steps), sample_rate=float(priv.sample_rate),
                     noise_multiplier=float(priv.noise_multiplier), delta=float(priv.delta),
                     mode=trainer.cfg.mode, seed=trainer.cfg.seed)
    write(result, trainer.run_dir)
    doc = {k: v for k, v in result.to_dict().items() if k not in ("in_scores", "out_scores")}
    doc["what"] = ("the run's mechanism (σ, q, steps, mode) in one run of the real pipeline "
                   "on a linear model with gradient canaries (swiftdp.audit.one_run)")
    return doc


def _audit_line(r: dict[str, Any]) -> str:
    a = r.get("audit")
    if not a:
        return "audit: not run"
    verdict = "VIOLATED" if a["violated"] else "consistent with the claim"
    return (f"audit: empirical lower bound ε ≥ {a['epsilon_lower_bound_fdp']:.3f} (f-DP) / "
            f"{a['epsilon_lower_bound']:.3f} ((ε, δ)) at {a['confidence']:.0%} confidence, "
            f"against ε = {a['epsilon_claimed']:.3f} claimed for the audited replay of this "
            f"run's mechanism ({a['canaries']} canaries; the most they can show: "
            f"{a['ceiling_fdp']:.3f}); {verdict}. Scores: audit.png.")


def _inputs_line(r: dict[str, Any]) -> str:
    a = r.get("audit_inputs")
    if not a:
        return ""
    claimed = a["epsilon_claimed"]
    against = "no claim (ε = ∞)" if claimed is None else f"ε = {claimed:.3f} claimed"
    verdict = "VIOLATED" if a["violated"] else "consistent with the claim"
    return (f"\naudit of the trained model (--audit-inputs): {a['canaries']} input canaries "
            f"({a['included']} in the training set), scored by the log-probability of their "
            f"label: lower bound ε ≥ {a['epsilon_lower_bound_fdp']:.3f} (f-DP) / "
            f"{a['epsilon_lower_bound']:.3f} ((ε, δ)) at {a['confidence']:.0%} confidence, "
            f"against {against} (the most they can show: {a['ceiling_fdp']:.3f}); {verdict}. "
            "Black-box, so weak by nature; the canaries were trained on. Scores: "
            "audit_inputs.png.")


def write_privacy_report(trainer: Trainer) -> None:
    """Write ``privacy.json`` and ``privacy.md`` into the run folder (atomically, rank 0 only)."""
    doc = privacy_report(trainer)
    if trainer.cfg.audit and trainer.dp is not None:
        doc["audit"] = audit_of(trainer)
    if trainer.input_canaries is not None:
        from swiftdp.cli import canaries

        doc["audit_inputs"] = canaries.audit_of(trainer, *trainer.input_canaries)
    report = _finite(doc)
    rundir.atomic_write_text(trainer.run_dir / rundir.PRIVACY_JSON,
                             json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    rundir.atomic_write_text(trainer.run_dir / rundir.PRIVACY_MD, markdown(report))

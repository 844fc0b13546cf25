"""The run folder of ``swiftdp train``: configuration, metrics, checkpoints, plot.

====================  =========================================================
file                  content
====================  =========================================================
``config.yaml``       the resolved options, plus a ``derived`` section (σ, q,
                      steps, dataset sizes, versions); ``--config`` reads it back
``metrics.json``      per epoch: loss, train and test metric (accuracy, or
                      perplexity for text), ε, steps, time; rewritten
                      atomically after every epoch
``checkpoint.pt``     the complete training state after the last complete epoch
                      (``--resume`` continues from it); written atomically
``model.pt``          the final model's ``state_dict`` (the evaluated weights)
``accuracy_vs_epsilon.png``  test accuracy against ε spent
                      (``perplexity_vs_epsilon.png`` for text)
``privacy.json``      the privacy report when the run finishes: mechanism, σ,
                      C, q, steps, δ, ε by each accountant, assumptions
                      (:mod:`swiftdp.cli.report`); ``privacy.md`` the same to read
====================  =========================================================
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from swiftdp.errors import InvalidArgumentError
from swiftdp.io import atomic_write

CONFIG = "config.yaml"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
PLOT = "accuracy_vs_epsilon.png"
"""The plot of a classification run (:func:`plot_name` in general)."""
PRIVACY_JSON = "privacy.json"
PRIVACY_MD = "privacy.md"


def plot_name(metric: str) -> str:
    """The plot's file name for ``metric``: ``accuracy_vs_epsilon.png``, ``perplexity_vs_epsilon.png``."""
    return f"{metric}_vs_epsilon.png"


def check_out(out: str | None) -> None:
    """Refuse an ``--out`` folder that holds a run already (before any work is done).

    Raises:
        InvalidArgumentError: ``out`` holds a checkpoint (continue it with ``--resume``).
    """
    if out is not None and (Path(out) / CHECKPOINT).exists():
        raise InvalidArgumentError(
            f"--out {out!r} already holds a run ({CHECKPOINT}); continue it with "
            f"--resume {out}, or choose another folder."
        )


def new_run_dir(out: str | None, dataset: str, model: str) -> Path:
    """Create the run folder: ``out``, or ``runs/<timestamp>-<dataset>-<model>``.

    Raises:
        InvalidArgumentError: ``out`` holds a checkpoint already (use ``--resume``)
            or cannot be created.
    """
    check_out(out)
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{stamp}-{dataset}-{model}"
        i = 1
        while path.exists():
            i += 1
            path = Path("runs") / f"{stamp}-{dataset}-{model}-{i}"
    else:
        path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"Cannot create the run folder {str(path)!r}: {e.strerror}.") from None
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_config(run_dir: Path, options: dict[str, Any], derived: dict[str, Any]) -> None:
    """Write ``config.yaml``: the options, then the ``derived`` section."""
    text = yaml.safe_dump(options, sort_keys=False)
    text += yaml.safe_dump({"derived": derived}, sort_keys=False)
    atomic_write_text(run_dir / CONFIG, text)


def read_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a run's ``config.yaml``; returns ``(options, derived)``.

    Raises:
        InvalidArgumentError: the folder or its config is missing or unreadable.
    """
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise InvalidArgumentError(f"--resume {str(run_dir)!r} is not a folder.")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        raise InvalidArgumentError(
            f"--resume {str(run_dir)!r} has no readable {CONFIG}; it is not a swiftdp run folder."
        ) from None
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"--resume {str(run_dir)!r}: {CONFIG} is not a mapping.")
    derived = raw.pop("derived", {}) or {}
    return raw, derived


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Rewrite ``metrics.json`` atomically."""
    atomic_write_text(run_dir / METRICS, json.dumps(metrics, indent=2) + "\n")


def plot_metric(run_dir: Path, epochs: list[dict[str, Any]], eval_name: str, metric: str,
                private: bool) -> Path:
    """Plot the evaluated metric against ε spent (against epochs when non-private).

    Accuracy is shown in percent; perplexity on a log scale (lower is better).

    Args:
        run_dir: the run folder.
        epochs: the per-epoch rows of ``metrics.json``.
        eval_name: ``"test"`` or ``"validation"``.
        metric: ``"accuracy"`` or ``"perplexity"``.
        private: whether ε is finite (the x axis).

    Returns:
        The file written, :func:`plot_name` of ``metric``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    scale = 100.0 if metric == "accuracy" else 1.0
    values = [scale * e[f"{eval_name}_{metric}"] for e in epochs]
    if private:
        ax.plot([e["epsilon"] for e in epochs], values, marker="o")
        ax.set_xlabel("ε spent")
    else:
        ax.plot([e["epoch"] for e in epochs], values, marker="o")
        ax.set_xlabel("epoch (non-private)")
    if metric == "accuracy":
        ax.set_ylabel(f"{eval_name} accuracy (%)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel(f"{eval_name} {metric} (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / plot_name(metric)
    fig.savefig(path)
    plt.close(fig)
    return path

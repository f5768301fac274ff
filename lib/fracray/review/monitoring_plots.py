"""The monitoring report's figures (PNG, matplotlib's Agg backend) and the report as files.

:func:`render_plots` draws, from a :class:`~fracray.review.monitoring.MonitoringReport`:

- ``distribution``: the run's P(fracture) against the model's validation distribution, with the
  run's PSI and an alarm banner when it reaches the alarm threshold;
- ``day``, ``body_part``, ``equipment`` (those available): per group, the distribution of
  P(fracture) (each column a group's histogram, as shares), the positive rate, the reject and
  out-of-scope rates, and PSI against the warn / alarm thresholds (alarms in red);
- ``concordance`` (with feedback): sensitivity, specificity, PPV, NPV with their Wilson 95 %
  intervals and counts.

:func:`write_report` writes them and ``report.json`` into a folder (local or s3://): what
``fracray monitor RUN --output DIR`` leaves for a job.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from .. import storage
from ..metrics import drift
from ..storage import StorageOptions
from .monitoring import MonitoringReport

__all__ = ["render_plots", "write_report", "REPORT_FILE"]

REPORT_FILE = "report.json"
_LEVEL_COLOURS = {"ok": "#4c9a2a", "warn": "#e8a317", "alarm": "#c0392b", "insufficient": "#b0b0b0",
                  "unavailable": "#d0d0d0"}
_MAX_LABELS = 40  # x tick labels shown per grouping plot (the rest thinned)


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kwargs)


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _shares(counts) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    return c / c.sum() if c.sum() else c


def plot_distribution(report: MonitoringReport) -> bytes:
    plt, (fig, ax) = _figure(figsize=(8, 4.5))
    edges = np.asarray(drift.histogram_edges())
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    overall = report.overall
    ax.bar(centres, _shares(overall.histogram), width=width * 0.9, alpha=0.6, color="#2c7fb8",
           label=f"this run ({overall.scored} scored images)")
    if report.validation:
        reference = report.validation["overall"]
        ax.step(edges, np.r_[_shares(reference["histogram_counts"]), 0], where="post", color="black", linewidth=1.5,
                label=f"validation ({reference['n']} images)")
    ax.set_xlabel("P(fracture)")
    ax.set_ylabel("share of scored images")
    ax.set_xlim(0, 1)
    level = overall.psi_level
    title = "P(fracture): run vs the model's validation distribution"
    if overall.psi is not None:
        title += f"\nPSI {overall.psi:.3f} ({level}; warn {drift.PSI_WARN}, alarm {drift.PSI_ALARM}, " \
                 f"noise floor {overall.psi_noise_floor:.3f})"
    elif not report.drift.get("available"):
        title += "\nno validation distribution: drift not computed"
    ax.set_title(title, fontsize=10)
    if report.alarms:
        ax.text(0.5, 0.93, f"DRIFT ALARM: {len(report.alarms)} group(s) with PSI >= {drift.PSI_ALARM}",
                transform=ax.transAxes, ha="center", va="top", color="white", fontsize=11, fontweight="bold",
                bbox={"facecolor": _LEVEL_COLOURS["alarm"], "edgecolor": "none", "pad": 4})
    ax.legend(loc="upper right" if not report.alarms else "center right", fontsize=8)
    return _png(plt, fig)


def plot_grouping(report: MonitoringReport, name: str) -> bytes:
    grouping = report.groupings[name]
    groups = list(grouping.groups)
    keys = [g.key for g in groups]
    x = np.arange(len(groups))
    plt, (fig, axes) = _figure(4, 1, figsize=(max(8.0, min(24.0, 0.35 * len(groups) + 4)), 11), sharex=True,
                               gridspec_kw={"height_ratios": [2.2, 1, 1, 1.2]})
    # 1. the distribution of P(fracture) per group: each column a group's histogram as shares
    matrix = np.stack([_shares(g.histogram) for g in groups], axis=1) if groups else np.zeros((20, 0))
    axes[0].imshow(matrix, aspect="auto", origin="lower", cmap="Blues", extent=(-0.5, len(groups) - 0.5, 0, 1),
                   vmin=0, vmax=max(0.3, float(matrix.max()) if matrix.size else 0.3))
    axes[0].plot(x, [g.mean_probability if g.mean_probability is not None else np.nan for g in groups], "o-",
                 color="#e6550d", markersize=3, label="mean P(fracture)")
    if report.validation and report.validation["overall"].get("mean") is not None:
        axes[0].axhline(report.validation["overall"]["mean"], color="black", linestyle="--", linewidth=1,
                        label="validation mean")
    axes[0].set_ylabel("P(fracture)\n(shade: share of images)")
    axes[0].legend(loc="upper right", fontsize=7)
    axes[0].set_title(f"By {name.replace('_', ' ')}: {grouping.source}", fontsize=10)
    # 2. positive rate
    axes[1].bar(x, [g.positive_rate or 0 for g in groups], color="#756bb1")
    axes[1].set_ylabel("positive rate\n(label 1 / scored)")
    axes[1].set_ylim(0, 1)
    # 3. rejects and out of scope
    axes[2].bar(x - 0.2, [g.reject_rate or 0 for g in groups], width=0.4, color="#969696", label="rejected")
    axes[2].bar(x + 0.2, [g.out_of_scope_rate or 0 for g in groups], width=0.4, color="#fd8d3c",
                label="out of scope")
    axes[2].set_ylim(0, max([0.05] + [1.15 * (g.reject_rate or 0) for g in groups]
                            + [1.15 * (g.out_of_scope_rate or 0) for g in groups]))
    axes[2].set_ylabel("share of inputs")
    axes[2].legend(loc="upper right", fontsize=7)
    # 4. PSI against its thresholds
    colours = [_LEVEL_COLOURS.get(g.psi_level, "#d0d0d0") for g in groups]
    axes[3].bar(x, [g.psi or 0 for g in groups], color=colours)
    axes[3].axhline(drift.PSI_WARN, color=_LEVEL_COLOURS["warn"], linestyle="--", linewidth=1,
                    label=f"warn {drift.PSI_WARN}")
    axes[3].axhline(drift.PSI_ALARM, color=_LEVEL_COLOURS["alarm"], linestyle="--", linewidth=1,
                    label=f"alarm {drift.PSI_ALARM}")
    for i, g in enumerate(groups):
        if g.psi_level == "alarm":
            axes[3].text(i, (g.psi or 0), "ALARM", ha="center", va="bottom", color=_LEVEL_COLOURS["alarm"],
                         fontsize=7, fontweight="bold")
    axes[3].set_ylabel(f"PSI\n(grey: < {drift.PSI_MIN_IMAGES} images)")
    axes[3].legend(loc="upper right", fontsize=7)
    step = max(1, int(np.ceil(len(groups) / _MAX_LABELS)))
    axes[3].set_xticks(x[::step])
    axes[3].set_xticklabels(keys[::step], rotation=60, ha="right", fontsize=7)
    axes[3].set_xlim(-0.5, max(len(groups) - 0.5, 0.5))
    return _png(plt, fig)


def plot_concordance(report: MonitoringReport) -> bytes:
    c = report.concordance or {}
    names = ["sensitivity", "specificity", "ppv", "npv"]
    plt, (fig, ax) = _figure(figsize=(7, 4.5))
    for i, name in enumerate(names):
        rate = c.get(name) or {}
        if rate.get("value") is None:
            ax.text(i, 0.5, "no\nstudies", ha="center", va="center", fontsize=8, color="grey")
            continue
        low, high = rate["ci95"]
        ax.errorbar(i, rate["value"], yerr=[[rate["value"] - low], [high - rate["value"]]], fmt="o", capsize=6,
                    color="#2c7fb8")
        ax.text(i + 0.08, rate["value"], f"{rate['value']:.2f}\n{rate['successes']}/{rate['n']}", fontsize=8,
                va="center")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(["sensitivity", "specificity", "PPV", "NPV"])
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.5, len(names) - 0.3)
    ax.set_ylabel("study level, Wilson 95 % interval")
    ax.set_title(f"Concordance with reviewers: {c.get('decided_studies', 0)} decided of {c.get('reviewed_studies', 0)} "
                 f"reviewed studies (TP {c.get('tp', 0)}, FP {c.get('fp', 0)}, TN {c.get('tn', 0)}, "
                 f"FN {c.get('fn', 0)})", fontsize=9)
    fig.text(0.01, -0.02, "Reviewed studies only (verification bias): sensitivity is optimistic.", fontsize=7,
             color="grey")
    return _png(plt, fig)


def render_plots(report: MonitoringReport) -> dict[str, bytes]:
    """{name: PNG bytes}: distribution, each available grouping, and concordance where there is feedback."""
    plots = {"distribution": plot_distribution(report)}
    for name, grouping in report.groupings.items():
        if grouping.available and grouping.groups:
            plots[name] = plot_grouping(report, name)
    if report.concordance is not None:
        plots["concordance"] = plot_concordance(report)
    return plots


def write_report(report: MonitoringReport, output: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """``output``/report.json and ``output``/<name>.png; returns {name: URI} of what was written."""
    written = {}
    for name, png in render_plots(report).items():
        uri = storage.join(output, f"{name}.png")
        storage.write_bytes(uri, png, options)
        written[name] = uri
    uri = storage.join(output, REPORT_FILE)
    storage.write_bytes(uri, (report.to_json() + "\n").encode(), options)
    written["report"] = uri
    return written

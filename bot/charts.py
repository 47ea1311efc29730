"""Matplotlib set-up shared by every chart: a CJK font so Chinese labels never render as boxes."""

from __future__ import annotations

from functools import cache
from pathlib import Path

CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "WenQuanYi Zen Hei", "SimHei")


@cache
def use_cjk_font() -> str | None:
    """Put the first installed CJK font first in matplotlib's sans-serif list; returns its name."""
    import matplotlib
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    if not installed.intersection(CJK_FONTS):
        # matplotlib caches its font list; a CJK font installed after that cache is invisible to it.
        for path in font_manager.findSystemFonts():
            if "CJK" in path or "wqy" in path.lower():
                font_manager.fontManager.addfont(path)
        installed = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed:
            matplotlib.rcParams["font.sans-serif"] = [name, *matplotlib.rcParams["font.sans-serif"]]
            matplotlib.rcParams["font.family"] = "sans-serif"
            matplotlib.rcParams["axes.unicode_minus"] = False
            return name
    return None


LABEL_COLOURS = {"S": "#4e79a7", "P": "#f28e2b", "I": "#e15759", "N": "#59a14f", "O": "#9c9c9c"}


def spin_timeline_png(timeline: list[str | None], counts: dict[str, int], title: str, path: Path) -> Path:
    """The SPIN mix over the call: one coloured mark per turn, and the overall mix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_cjk_font()
    labels = list(LABEL_COLOURS)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 3.6), dpi=110, height_ratios=[3, 1])
    for turn, label in enumerate(timeline, start=1):
        if label in LABEL_COLOURS:
            top.scatter(turn, labels.index(label), s=140, color=LABEL_COLOURS[label], zorder=3)
    top.plot(
        [t for t, lab in enumerate(timeline, start=1) if lab in LABEL_COLOURS],
        [labels.index(lab) for lab in timeline if lab in LABEL_COLOURS],
        color="#cccccc", zorder=1,
    )
    top.set_yticks(range(len(labels)), labels)
    top.set_xlim(0.5, max(len(timeline), 1) + 0.5)
    top.set_xticks(range(1, max(len(timeline), 1) + 1))
    top.set_ylim(len(labels) - 0.5, -0.5)
    top.set_xlabel("turn / 轮次")
    top.set_title(title, fontsize=10)
    top.grid(axis="x", alpha=0.3)
    total = sum(counts.values()) or 1
    left = 0.0
    for label in labels:
        share = counts.get(label, 0) / total
        if share:
            bottom.barh(0, share, left=left, color=LABEL_COLOURS[label])
            bottom.text(left + share / 2, 0, f"{label} {share:.0%}", ha="center", va="center", color="white",
                        fontsize=8)
        left += share
    bottom.set_xlim(0, 1)
    bottom.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

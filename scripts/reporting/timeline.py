"""The node-hours timeline (results/timeline.png): one row per engine, or per node when a
run has more than MAX_ENGINE_ROWS engines; the data comes from reporting/accounting.py."""

from __future__ import annotations

import io
from collections.abc import Sequence

from reporting.accounting import LOCAL, Submission, clip, union, warm_ready

# Above this many engines the timeline has one row per node, shaded by busy fraction.
MAX_ENGINE_ROWS = 96


def row_names(subs: Sequence[Submission]) -> list[str]:
    """The timeline's rows: one per engine, or one per node above MAX_ENGINE_ROWS."""
    slots = sum(len(s.slots) for s in subs)
    if slots > MAX_ENGINE_ROWS:
        return [f"{s.id} {h}" if s.id != LOCAL else h for s in subs for h in s.hosts]
    return [f"{s.id} {slot.name}" if s.id != LOCAL else slot.name for s in subs for slot in s.slots]


def timeline_png(subs: Sequence[Submission]) -> bytes:
    """One row per engine: start-up (grey), each rank's request a bar (colours
    alternate), idle left white; set-up and stop shaded across the submission's rows.
    More than MAX_ENGINE_ROWS engines: one row per node, each time bin shaded by the
    share of its engines that were serving. The row names are also in the PNG's
    ``Rows`` text field."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = row_names(subs)
    per_node = sum(len(s.slots) for s in subs) > MAX_ENGINE_ROWS
    origin = min((s.start for s in subs), default=0.0)
    height = min(40.0, max(3.0, 0.6 + 0.22 * len(names)))
    figure = Figure(figsize=(12, height), layout="constrained")
    axes = figure.subplots()
    palette = matplotlib.colormaps["tab10"]
    row = 0
    for s in subs:
        rows_of_sub = len(s.hosts) if per_node else len(s.slots)
        band = (row - 0.5, rows_of_sub)
        for low, high, colour in ((s.start, s.staged, "#f4c27a"), (s.ranks_done, s.end, "#c9a0dc")):
            if high > low:
                axes.broken_barh([(low - origin, high - low)], band, color=colour, alpha=0.5)
        if per_node:
            row = _node_rows(axes, s, row, origin)
            continue
        for slot in s.slots:
            ready = warm_ready(slot, s.staged, s.ranks_done)
            starting = [(s.staged, ready)] if ready else []
            starting += slot.start_intervals
            spans = [(a - origin, b - a) for a, b in clip(union(starting), s.start, s.end)]
            axes.broken_barh(spans, (row - 0.4, 0.8), color="0.6")
            # one call per colour: thousands of ranks draw as two collections per row
            bars = [(a - origin, b - a) for a, b in sorted(slot.busy_intervals)]
            for parity in (0, 1):
                axes.broken_barh(bars[parity::2], (row - 0.35, 0.7), color=palette(parity))
            row += 1
    axes.set_yticks(range(len(names)))
    axes.set_yticklabels(names, fontsize=7 if len(names) > 24 else 9)
    axes.set_ylim(len(names) - 0.5, -0.5)
    if subs:  # (an image of node rows would otherwise narrow the axes to its own span)
        axes.set_xlim(0, max(s.end for s in subs) - origin)
    axes.set_xlabel("seconds since the start")
    handles = [
        Patch(color="#f4c27a", alpha=0.5, label="set-up (site setup, staging)"),
        Patch(color="0.6", label="engine start"),
        Patch(color=palette(0), label="rank requests (serving; colours alternate)"),
        Patch(color="white", label="idle"),
        Patch(color="#c9a0dc", alpha=0.5, label="stop"),
    ]
    if per_node:  # engine start and idle: both unshaded
        handles[1:4] = [Patch(color="tab:blue", label="share of the node's engines serving")]
    figure.legend(handles=handles, loc="outside upper center", ncols=5, fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Rows": "\n".join(names)})
    return buffer.getvalue()


def busy_shares(sub: Submission, bins: int = 200) -> list[list[float]]:
    """Per host of ``sub``: the share of its engines serving in each of ``bins`` equal
    time bins from staged to ranks done (each request adds to the bins it covers)."""
    low, high = sub.staged, sub.ranks_done
    width = (high - low) / bins
    shares = []
    for host in sub.hosts:
        members = [slot for slot in sub.slots if slot.host == host]
        row = [0.0] * bins
        for member in members:
            for a, b in union(clip(member.busy_intervals, low, high)):
                first, last = int((a - low) / width), min(bins - 1, int((b - low) / width))
                for k in range(first, last + 1):
                    bin_low = low + k * width
                    overlap = min(b, bin_low + width) - max(a, bin_low)
                    row[k] += max(0.0, overlap) / (width * len(members))
        shares.append(row)
    return shares


def _node_rows(axes, sub: Submission, row: int, origin: float) -> int:
    """Per node: one image row, each time bin shaded by its engines' busy share."""
    if sub.ranks_done > sub.staged and sub.hosts:
        axes.imshow(
            busy_shares(sub),
            cmap="Blues",
            vmin=0,
            vmax=1,
            aspect="auto",
            interpolation="nearest",
            extent=(
                sub.staged - origin,
                sub.ranks_done - origin,
                row + len(sub.hosts) - 0.5,
                row - 0.5,
            ),
        )
    return row + len(sub.hosts)


def png_rows(data: bytes) -> list[str]:
    """The row names a timeline PNG carries (its ``Rows`` text chunk)."""
    at = data.find(b"tEXtRows\x00")
    if at < 0:
        return []
    size = int.from_bytes(data[at - 4 : at], "big")
    text = data[at + 9 : at + 4 + size].decode("latin-1")
    return text.split("\n") if text else []

"""Pictures of a run: ranked lists, CMC and training curves, and a static HTML report.

Everything draws with matplotlib's object API on an Agg canvas (never pyplot), so importing
these modules neither needs a display nor changes the backend of a user's interactive session.
"""

from strongreid.viz.curves import plot_cmc, plot_training_curves, read_metrics
from strongreid.viz.ranked import (
    RankedLayout,
    draw_ranked_lists,
    load_ranking,
    match_kind,
    select_queries,
    visualize_command,
)
from strongreid.viz.report import report_command, write_report

__all__ = [
    "RankedLayout",
    "draw_ranked_lists",
    "load_ranking",
    "match_kind",
    "plot_cmc",
    "plot_training_curves",
    "read_metrics",
    "report_command",
    "select_queries",
    "visualize_command",
    "write_report",
]

"""Weight-decomposition analysis (the DoRA paper's ΔM / ΔD) of adapter files and full fine-tunes.

- `decomposition`: ΔM and ΔD of one weight against its base;
- `collect`: rows per module and step from adapter files or full checkpoints, layer groups;
- `table`: per-group fits (slope of ΔD on ΔM, Pearson r), CSV / JSON;
- `plots`: scatter PNGs (matplotlib, optional);
- `report`: all of the above into one folder (what `sdtrain analyze` runs).
"""

from sdtrain.analysis.collect import (
    GROUPS,
    ChangeRow,
    adapter_rows,
    analyze_adapters,
    analyze_full_checkpoints,
    full_checkpoint_rows,
    layer_group,
)
from sdtrain.analysis.decomposition import DecompositionChange, channel_vectors, decomposition_change
from sdtrain.analysis.report import AnalysisReport, write_report
from sdtrain.analysis.table import GroupFit, fit_line, format_fits, group_fits, read_csv

__all__ = [
    "GROUPS", "ChangeRow", "adapter_rows", "analyze_adapters", "analyze_full_checkpoints", "full_checkpoint_rows",
    "layer_group", "DecompositionChange", "channel_vectors", "decomposition_change", "AnalysisReport",
    "write_report", "GroupFit", "fit_line", "format_fits", "group_fits", "read_csv",
]

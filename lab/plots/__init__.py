"""The dashboard's figures, for notebooks too: plotly figures of runs and of what the analyses return.

Two layers. The one-call functions take runs and do the analysis themselves:

    import lab
    a, b = lab.load_run("runs/modadd_quick"), lab.load_run("runs/a_and_b")
    lab.plot_curves([a, b], "accuracy")          # train dotted, test solid, memorised ● and grokked ★
    lab.plot_attention(b, "grab a cab")          # every head's pattern at the last checkpoint
    lab.plot_progress(a)                         # the Progress page: restricted/excluded loss, Gini, Σθ²

The builders below them (`curves_figure`, `attention_figure`, ...) take what the analyses return,
so the dashboard, which caches the analyses, draws with the very same code: a figure on a
dashboard page is the figure the matching `plot_*` call returns. Nothing here imports Streamlit.

One module per dashboard page, sharing `style` (colours, the step axis, log axes, square grids):
curves, attention, progress, heads, sweeps (its numbers from `lab.sweeps.stats`); `document` writes
several figures into one HTML file. This package re-exports their public names.
"""

from lab.plots.attention import (  # noqa: F401
    LONG_INPUT, MASKED_COLOR, MIN_CELL_PX, STRIP_WINDOW, attention_figure, attention_grid_figure, modular_attention_figure,
    modular_grid_figure, plot_attention, plot_modular_attention, plot_read_attention, read_attention_figure,
    next_tokens_figure, plot_next_tokens,
)
from lab.plots.circuits import (  # noqa: F401
    attribution_figure, circuit_history_figure, composition_figure, logit_lens_figure, ov_circuit_figure, patching_figure,
    plot_circuit_history, plot_composition_scores, plot_logit_attribution, plot_logit_lens, plot_ov_circuit, plot_patching,
    plot_qk_circuit, qk_circuit_figure,
)
from lab.plots.curves import curves_figure, ema_smooth, plot_curves, plot_weight_norm, weight_norm_figure  # noqa: F401
from lab.plots.document import figures_html  # noqa: F401
from lab.plots.heads import (  # noqa: F401
    ablation_figure, ablation_title, letter_attention_figure, plot_ablation, plot_letter_attention,
)
from lab.plots.induction import (  # noqa: F401
    head_scores_figure, induction_figure, plot_induction, position_loss_figure,
)
from lab.plots.progress import (  # noqa: F401
    fourier_norms_figure, key_frequencies_figure, plot_fourier_norms, plot_key_frequencies, plot_progress,
    progress_figure, progress_losses_figure, progress_measures_figure,
)
from lab.plots.style import (  # noqa: F401
    ATTENTION_SCALE, PALETTE, SPLIT_DASH, layout, log_step_axis, run_color, run_colors, step_axis, step_label,
)
from lab.plots.sweeps import (  # noqa: F401
    NEVER_COLOR, OUTCOME_LABELS, PHASE_COLORS, PHASE_SHORT, SPREADS, STEP_OUTCOMES, axis_values, grok_steps_figure,
    phase_diagram_figure, phase_thresholds_text, plot_grok_steps, plot_phase_diagram, plot_sweep_outcome,
    sweep_cells, sweep_members, sweep_outcome_figure, sweep_outcome_table, sweep_titles, value_text,
)

"""The reporting layer's figures and pages, in two halves that never import each other's users:

* ``live``: the observer of a running run (``Reporter``): pictures that need its models and data
  (Grad-CAM, t-SNE, exemplars, generated samples), ``accuracy.png``, TensorBoard;
* results to figures and pages, from ``metrics.json`` alone: ``figures`` (plots), ``html``
  (``cilearn report``), ``summaries`` (a seed directory's summary, ``cilearn compare``'s files);
  ``pictures`` draws image grids for ``live``.
"""
from .figures import accuracy_plot, curves_plot
from .html import SECTIONS, html_report, render_html
from .live import Reporter
from .pictures import exemplar_plot, overlay_grid, sample_grid, tsne_figure
from .summaries import compare_dirs, write_compare, write_seed_summary

__all__ = ["Reporter", "html_report", "render_html", "SECTIONS", "write_seed_summary", "write_compare", "compare_dirs",
           "accuracy_plot", "curves_plot", "overlay_grid", "sample_grid", "exemplar_plot", "tsne_figure"]

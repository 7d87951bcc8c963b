"""Views over core events: ipywidgets in a widget frontend, text everywhere else.

Nothing here is imported by the core; the magics pick a view with :func:`training_view`.
"""
from __future__ import annotations

from .text import TextReporter


def widget_frontend() -> bool:
    """True when the running kernel talks to a frontend that can show ipywidgets (a Jupyter kernel)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    if ip is None or not getattr(ip, "kernel", None):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def training_view(use_widgets: bool = True, background: bool = False, session=None):
    """The listener that shows a training run: the dashboard where widgets render, else text."""
    if use_widgets and widget_frontend():
        try:
            from .dashboard import TrainingDashboard
        except ImportError:
            return TextReporter()
        return TrainingDashboard(background=background, session=session)
    return TextReporter()

"""transformers as the causal LM kind uses it: quiet (a successful run prints no noise)."""

from __future__ import annotations


def quiet_transformers() -> None:
    """No progress bars or reminders from transformers in a run's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

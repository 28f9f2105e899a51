"""Errors the library raises about the values it was given, shaped so that each front end can
name the value its own way (the library says ``jpeg_quality``, the CLI ``--jpeg-quality``)."""
from __future__ import annotations


class SettingError(ValueError):
    """A bad value of one named setting (a function's parameter or a config field).

    ``str(error)`` reads ``"<setting> <problem>"``, e.g. ``"jpeg_quality must be in [1, 100], got 0"``.

    Args:
        setting: the setting's name as the library spells it (``jpeg_quality``).
        problem: what is wrong with its value, phrased to follow the name and naming no other
            setting by its spelling in some front end.
    """

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem

"""Admission: decide for every requested operation whether it runs."""

from aipipe.streams.admission.decide import Decision, decide

__all__ = ["Decision", "decide"]

"""aipipe: an event-sourced pipeline for AI operations on Apache Kafka.

The installed package is one namespace over the repository's folders (``pyproject.toml``
maps them): ``aipipe.schemas`` (the events and prices), ``aipipe.producers`` (emitting
and getting results back), ``aipipe.streams`` and ``aipipe.consumers`` (the workers),
and ``aipipe.infra`` (settings, services and the command line). This folder is the root
of that namespace only; ``python -m aipipe`` runs the command line.
"""

__version__ = "0.1.0"

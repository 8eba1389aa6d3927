"""The providers an operation may name: what a request's ``provider`` field can hold.

Which of them a deployment offers is its settings' choice (``AIPIPE_PROVIDERS``, and
``simulated`` only with ``AIPIPE_SIMULATED_ENABLED``); admission refuses the others.
"""

from __future__ import annotations

SIMULATED = "simulated"
# the real providers this code can call (see streams/generation/registry.py)
REAL_PROVIDERS = ("gemini", "openai", "stability")
KNOWN_PROVIDERS = (*REAL_PROVIDERS, SIMULATED)

"""Topic names, derived from one prefix so that tests and tenants can run side by side."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """The pipeline's topics under ``prefix`` (``AIPIPE_TOPIC_PREFIX``)."""

    prefix: str = "aipipe"

    @property
    def requested(self) -> str:
        return f"{self.prefix}.operations.requested"

    @property
    def admitted(self) -> str:
        return f"{self.prefix}.operations.admitted"

    @property
    def rejected(self) -> str:
        return f"{self.prefix}.operations.rejected"

    @property
    def completed(self) -> str:
        return f"{self.prefix}.operations.completed"

    @property
    def video_polls(self) -> str:
        return f"{self.prefix}.video.polls"

    @property
    def providers(self) -> str:
        """Provider health: ``provider.circuit_opened`` and ``provider.circuit_closed``."""
        return f"{self.prefix}.providers"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def budgets(self) -> str:
        """``budget.set`` (projected into ClickHouse) and ``budget.threshold_crossed``."""
        return f"{self.prefix}.budgets"

    @property
    def webhook_retries(self) -> str:
        """Webhook deliveries waiting for their next try (``consumers/webhooks``): the
        webhook consumers' own, not an event topic, so not in ``all`` (nor archived)."""
        return f"{self.prefix}-webhooks-retry"

    def all(self) -> tuple[str, ...]:
        return (
            self.requested,
            self.admitted,
            self.rejected,
            self.completed,
            self.video_polls,
            self.providers,
            self.deadletter,
            self.budgets,
        )

    def created(self) -> tuple[str, ...]:
        """Every topic ``aipipe topics create`` makes: the event topics and the retry topic."""
        return (*self.all(), self.webhook_retries)

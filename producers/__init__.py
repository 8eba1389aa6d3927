"""The library upstream services use to emit aipipe events to Kafka."""

from aipipe.producers.producer import DeliveryError, EventProducer, headers_for

__all__ = ["DeliveryError", "EventProducer", "headers_for"]

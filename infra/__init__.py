"""Settings, logging, local services, the ClickHouse read endpoint and the aipipe CLI."""

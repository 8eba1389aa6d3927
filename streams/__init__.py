"""The faust stream processors: admission and generation, built by ``create_app``."""

"""binloop services: one folder each, each with settings, core logic and a create_app factory."""

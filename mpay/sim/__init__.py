"""Simulators for development, tests and demonstrations: stand-ins for hardware and phones."""

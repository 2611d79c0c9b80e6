"""migfd: fd-passing (backend-transfer) live migration, studied from real runs."""

__version__ = "0.1.0"

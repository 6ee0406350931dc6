"""Unit tests use no services: they override the database fixtures to fail loudly."""

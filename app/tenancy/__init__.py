"""Tenants (merchants) and their API keys."""

"""Marketer and integration endpoints, authenticated by a tenant API key."""

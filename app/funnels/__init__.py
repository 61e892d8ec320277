"""Stored funnels: immutable versions, member instances and their stage history."""

"""Durable timers: rows with a due time, claimed by workers and fired through the write path."""

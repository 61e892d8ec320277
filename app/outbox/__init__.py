"""Outbound actions: rows written by the dispatcher, delivered as signed webhooks."""

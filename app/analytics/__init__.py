"""Read-only reports over the stage history, the event log and the mechanics' tables.

Everything here is a query: counts are computed by the database (grouped, indexed), never
by looping over members in Python, and the same statements run on SQLite and PostgreSQL.
"""

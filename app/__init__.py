"""Flywheel: AARRR funnel campaign engine for community commerce."""

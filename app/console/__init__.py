"""The marketer's console: server-rendered pages at /console (Jinja2, autoescaped) with a
small charting script shipped in the package, so it works offline."""

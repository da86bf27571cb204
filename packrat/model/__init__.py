"""Models and archives: the input spec (`packrat.json`), the request wire format, loading an
archive's model, the built-in zoo and building `.mar` archives."""

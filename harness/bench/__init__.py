"""``harness bench``'s machinery: one row measured (``measure``), the sweep of rows in worker
processes (``sweep``, ``worker``, ``prewarm``), the operators' cost models (``costs``), the
device's ceilings (``ceilings``), and the tables, plots and report page (``report``).
docs/bench.md describes a sweep."""

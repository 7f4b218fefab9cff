"""``harness check``'s machinery: the engine that runs implementations against the float64
truth (``engine``), the tolerances (``tolerances``), NaN-poisoned allocations (``poison``), the
bounds-checked interpreter the tests run under (``bounds``), and the tables and plots
(``report``). docs/check.md describes what is checked."""

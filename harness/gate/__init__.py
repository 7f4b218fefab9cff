"""``harness gate``'s machinery: suites from TOML (``suites``), a suite run into entries
(``run``, with the CPU's math pinned by ``cpu_pins``), baselines per device class
(``baseline``), the verdict (``compare``) and the report files (``report``). docs/gate.md
describes the gate."""

"""Seeing inside evaluated traces: attention per step kind (``attention``), memory-vs-reasoning error
attribution and decoupling checks (``judges``), figures (``plots``) and a self-contained HTML page
(``report``). Every analysis is a function from saved outputs (``results.jsonl`` rows) to tables; figures
and HTML take those tables and never load a model."""

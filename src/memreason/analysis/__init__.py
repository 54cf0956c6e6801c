"""Seeing inside evaluated traces. Every analysis is a function from saved outputs (``Result`` rows of
``results.jsonl``) to tables; figures and HTML take those tables and never load a model.

* ``attention``: span kinds of tokens (from ``memreason.model.tokens.spans``), attention mass per span kind
  of one teacher-forced sequence, the prompts rows were given; ``attention_tables``: many examples'
  masses as tables with bootstrap CIs, and their files.
* ``judges``: the judge interface, verdicts, the LLM judge, the resumable runner and the summaries;
  ``exact_judge``: memory steps against a table of true facts; ``world_judge``: every step against a
  synthetic world.
* ``cloze``: does a model know a world's facts (ranking continuations).
* ``plots``: every figure memreason draws; ``report``: one self-contained HTML page.
"""

"""The A/B study of BASIC against LLaVA (issue 13): protocol (``docs/ab_study.md``), data, engine,
evaluation, statistics and report. Run it with ``scripts/ab_study.py``."""

"""The A/B study of BASIC against LLaVA (issue 13): protocol (``docs/ab_study.md``), data, engine,
evaluation, statistics and report. Run it with ``scripts/ab_study.py``.

Research code, not part of the installed ``nemo_basic`` package (``setup.py`` does not ship it): it is
the package ``study`` when ``research/`` is on ``sys.path`` -- ``scripts/ab_study.py`` and
``scripts/grad_ratio.py`` put it there, ``pytest.ini`` does for the tests, and from the repository
root ``PYTHONPATH=research python -m study.report OUT`` runs a module. It imports ``nemo_basic``
(the recipes' model and configuration, the data, the export and the analysis) like any user code."""

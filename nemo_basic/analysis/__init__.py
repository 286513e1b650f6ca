"""Seeing the alignment: the visual logit lens, alignment metrics and the replacement probe.

* :mod:`~nemo_basic.analysis.nearest` -- nearest tokens by cosine in E (METHOD.md eq. 2), chunked;
* :mod:`~nemo_basic.analysis.metrics` -- ``meaningful``, ``grounded`` (+ top-5), ``distinct_per_image``,
  ``top_token_share`` (definitions in its docstring);
* :mod:`~nemo_basic.analysis.lens` / :mod:`~nemo_basic.analysis.probe` -- on an HF LLaVA (our
  checkpoints via the HF export); :mod:`~nemo_basic.analysis.render` -- PNGs and ``index.html``;
* :mod:`~nemo_basic.analysis.scenes` -- fresh labelled synthetic scenes on the model's patch grid;
* :mod:`~nemo_basic.analysis.callback` -- ``AlignmentMonitor``, the training callback
  (``analysis.every_n_steps`` in the recipes).

CLI: ``python -m nemo_basic.analysis {lens,probe} --help``. This ``__init__`` imports nothing heavy.
"""

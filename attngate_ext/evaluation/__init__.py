"""The evaluation wing: baseline policies, perplexity and multiple-choice scoring, plots.

* :mod:`.policies`: the baselines as scoring rules (window, StreamingLLM, random, H2O, SnapKV) and the budgets;
* :mod:`.in_context`: the baselines evicting while the prompt is read; :mod:`.post_prefill`: pruning after it;
* :mod:`.evaluate`: ``python -m attngate_ext.evaluate``; :mod:`.perplexity`: token windows and perplexity;
  :mod:`.plots`: the figures.
"""

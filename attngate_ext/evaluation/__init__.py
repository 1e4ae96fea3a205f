"""The evaluation wing: baseline policies, perplexity and multiple-choice scoring, plots."""

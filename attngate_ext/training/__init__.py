"""The training wing: the losses and objectives of the gates, training data, and ``python -m attngate_ext.train``.

* :mod:`.losses`: the eviction and distillation losses, the retention statistics;
* :mod:`.objectives`: what one micro-batch computes per objective (lm, distill, attention), set by an
  :class:`~.objectives.ObjectiveConfig`; :mod:`.attention_targets`: the future-attention targets;
* :mod:`.data`: packing text documents, SFT records; :mod:`.train`: the command line and its loop;
* :mod:`.checkpoint`, :mod:`.distributed`, :mod:`.out_dir`: checkpoints, data parallelism, the ``--out`` folder;
* :mod:`.utils`: the helpers the train and evaluate command lines share.
"""

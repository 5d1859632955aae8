"""What a command does, as a short composition of named steps.

`prepare` resolves a recipe once (strategy, precision, XLA, data, classifier, task,
augmentation, losses) into a `Prepared`; `run` (`kcls recipe run`), `lr_find`
(`kcls lr-find`), `export` (`kcls export`) and `pretrain` (`kcls pretrain`) compose it
with the mechanisms of the packages below.
"""

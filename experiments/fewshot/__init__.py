"""The image few-shot pipeline that the Omniglot and Mini-ImageNet launchers share.

``pipeline``: the configuration, training, evaluation and episode commands;
``cli``: their command line; ``records``: result records and the table built
from them.  It is an experiment, not the library: it composes what
``jaxmeta`` exports (learners, the training loop, evaluation, data sets).
"""

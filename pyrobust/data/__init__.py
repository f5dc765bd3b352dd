"""Data: the :class:`~pyrobust.data.dataset.Dataset` type, the readers (IDX, ``.npz``, image folders, CIFAR-10),
the dispatcher that turns a spec such as ``mnist:test`` into a dataset, and verified downloads. Imports only the
core."""

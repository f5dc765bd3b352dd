"""The paper's whole study: train, evaluate, select robust training images, retrain and compare (``reproduce``),
the same over several seeds (``seeds``), the selection itself (``selection``) and the study's report
(``report``). Imports everything below it; only the CLI imports it."""

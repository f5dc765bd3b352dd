"""The engine: onnxruntime sessions, the slot loop, run plans, back ends (one process, parallel sessions, Dask)
and measured tuning. Imports only the core and the data; never the store (its sibling)."""

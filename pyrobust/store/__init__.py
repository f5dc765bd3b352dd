"""Run folders: their format (results, summary), the run folder's lock, checkpoint and resume decision, and
resumable stages. Imports only the core and the data; never the engine (its sibling)."""

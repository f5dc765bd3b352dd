"""Files: atomic writes and bounded reads, the run-folder format (results, summary), the run folder's lock,
checkpoint and resume decision, and resumable stages. Imports only the base modules."""

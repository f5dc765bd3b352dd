"""``pyrobust gate``: the policy and its checks (``policy``), running the models to decide them (``run``) and the
reports CI systems read (``reports``). Imports the core, the data, the engine and the store."""

"""Dataset sources: local files (``file``), hub datasets (``hub``) and the generated verifiable
tasks of the embedded default recipe (``builtin_tasks``)."""

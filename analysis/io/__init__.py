"""Files and the command line: reading / writing model files (:mod:`.model_io`) and the ``decomp`` CLI (:mod:`.cli`)."""

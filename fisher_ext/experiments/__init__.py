"""The experiments behind ``fisher-ext``: the paper's claims reproduced with the package's own
Fisher Penalty and Tr(F) monitor (data, models, the training run, the parallel schedule, the
verdicts and the report)."""

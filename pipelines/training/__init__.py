"""The training wing: stream (WebDataset x cache join), alignment API, students, loop,
checkpoints, evaluation and probes."""

"""The training engine on top of the adapter: the training step with exact token-weighted accumulation, the optimizer
step inside backward, the frozen-prefix cache and `PockTrainer`. It may import `pock_hf.tuner`, `pock_hf.io` and
`pock_hf.data`, never `pock_hf.planning`."""

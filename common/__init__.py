"""The shared NumPy GPT every chapter builds on: config, model, optimizer, data, checkpoints, metrics, MPI."""

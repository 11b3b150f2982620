"""train_pfg.py's pieces: settings, setup, the step, the loop, optimizers, saving, samples and validation."""
